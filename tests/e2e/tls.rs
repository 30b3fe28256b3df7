//! A TLS cluster of real processes, its certificates made by `portmesh tls init`: clients set
//! up by environment alone, the leader of a cluster with tokens killed under load with nothing
//! duplicated or lost, a node with another CA's certificate kept out, the node refusing to
//! expose itself in plaintext, and tokens from the command line.

use std::path::Path;

use nix::sys::signal::Signal;
use portmesh_client::ClientOptions;
use portmesh_testkit as testkit;

use crate::cluster::ProcCluster;
use crate::support::*;

/// `serve` flags for the node certificate `name` in `certs`.
fn tls_flags(certs: &Path, name: &str) -> Vec<String> {
    let f = |file: &str| certs.join(file).to_str().unwrap().to_string();
    vec![
        "--tls-cert".into(),
        f(&format!("{name}.pem")),
        "--tls-key".into(),
        f(&format!("{name}.key")),
        "--tls-ca".into(),
        f("ca.pem"),
    ]
}

fn options(certs: &Path) -> ClientOptions {
    ClientOptions {
        tls: Some(portmesh_tls::ClientTls::load(&certs.join("ca.pem"), None, None).unwrap()),
        token: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_from_tls_init_serves_env_configured_clients_and_survives_a_leader_kill() {
    let home = Home::new();
    let certs = home.path().join("certs");
    let made =
        home.pm(&["tls", "init", certs.to_str().unwrap(), "--host", "localhost", "--json"]).ok().json();
    assert_eq!(made["ca_reused"], false);
    let mode = |f: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(certs.join(f)).unwrap().permissions().mode() & 0o777
    };
    assert_eq!((mode("ca.key"), mode("node.key"), mode("client.key")), (0o600, 0o600, 0o600));
    // Again with another name: the same CA issues a second node certificate.
    let again = home.pm(&["tls", "init", certs.to_str().unwrap(), "--name", "node-b", "--json"]).ok().json();
    assert_eq!((again["ca_reused"].as_bool(), again["client_new"].as_bool()), (Some(true), Some(false)));

    // With tokens on: clients send the admin token, the others join with a join token.
    let mut flags = tls_flags(&certs, "node");
    flags.push("--auth".into());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut c = ProcCluster::start_in(home, 3, &flags, options(&certs));
    c.big_pool().await;
    let admin_file = c.home.path().join("node0").join("admin.token");

    // A CLI with nothing but the environment set.
    let ca = certs.join("ca.pem");
    let alloc = |service: &str| {
        c.home
            .cmd(&["alloc", service])
            .env("PORTMESH_NODE", &c.addrs[1])
            .env("PORTMESH_TLS_CA", &ca)
            .env("PORTMESH_TOKEN_FILE", &admin_file)
            .output()
            .unwrap()
    };
    let out = alloc("env-only");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Without the CA the node says what is missing.
    let plain = c.home.pm(&["--node", &c.addrs[0], "ls"]);
    assert_ne!(plain.code, 0);
    assert!(plain.stderr.contains("requires TLS") && plain.stderr.contains("PORTMESH_TLS_CA"), "{plain:?}");

    // The fault scenario of the plaintext tier, over mTLS between members.
    let (addrs, opts) = (c.addrs.clone(), c.options.clone());
    let load = tokio::spawn(async move { testkit::load_with(&addrs, &opts, 32, 4, "tls").await });
    let leader = c.leader_index().await;
    c.wait_for_load(200).await;
    c.signal(leader, Signal::SIGKILL);
    drop(c.nodes[leader].take());
    let oracle = load.await.unwrap();
    eprintln!("kill -9 of a TLS leader under 32-client load: {}", oracle.summary());
    assert!(oracle.acked() >= 600, "the cluster kept serving: {}", oracle.summary());
    testkit::check_all(&c.converged().await, &oracle);
    c.restart(leader);
    let views = c.converged().await;
    testkit::check_all(&views, &oracle);
    assert_eq!(views.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_cas_certificate_cannot_join_and_the_term_stays() {
    let home = Home::new();
    let (certs, rogue) = (home.path().join("certs"), home.path().join("rogue"));
    home.pm(&["tls", "init", certs.to_str().unwrap()]).ok();
    home.pm(&["tls", "init", rogue.to_str().unwrap()]).ok();
    let flags = tls_flags(&certs, "node");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let c = ProcCluster::start_in(home, 1, &flags, options(&certs));
    let before = c.client(&c.addrs[0]).await.status().await.unwrap();

    // The rogue trusts the cluster's CA (it can verify the node) but holds another CA's certificate.
    let mut rogue_flags = tls_flags(&rogue, "node");
    rogue_flags[5] = certs.join("ca.pem").to_str().unwrap().to_string();
    let data = c.home.path().join("rogue-data");
    let mut args: Vec<&str> = vec!["serve", "--listen", "127.0.0.1:0", "--join", &c.addrs[0], "--data"];
    let data_s = data.to_str().unwrap().to_string();
    args.push(&data_s);
    args.extend(rogue_flags.iter().map(String::as_str));
    let out = c.home.cmd(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the rogue must not join: {stderr}");
    assert!(
        stderr.contains("refused the client's certificate")
            && stderr.contains("not signed by the cluster's CA"),
        "{stderr}"
    );

    let after = c.client(&c.addrs[0]).await.status().await.unwrap();
    assert_eq!((after.term, after.members.len(), after.revision), (before.term, 1, before.revision));
}

#[test]
fn a_node_refuses_to_serve_plaintext_beyond_loopback_or_advertise_a_wildcard() {
    let h = Home::new();
    let data = h.path().join("data");
    let data = data.to_str().unwrap();
    let r = h.pm(&["serve", "--listen", "0.0.0.0:0", "--data", data, "--bootstrap"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("binds every address") && r.stderr.contains("--advertise"), "{r:?}");
    let r = h.pm(&[
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--advertise",
        "10.0.0.1:7400",
        "--data",
        data,
        "--bootstrap",
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("is not a loopback address") && r.stderr.contains("--insecure"), "{r:?}");
    let r = h.pm(&["serve", "--tls-cert", "x.pem", "--data", data]);
    assert!(r.stderr.contains("--tls-key, --tls-ca missing"), "{r:?}");
    assert!(!Path::new(data).exists(), "nothing was created by a refused start");
}

#[test]
fn sighup_rereads_the_certificates_and_the_node_keeps_serving() {
    let h = Home::new();
    let certs = h.path().join("certs");
    h.pm(&["tls", "init", certs.to_str().unwrap()]).ok();
    let log = h.path().join("serve.log");
    let data = h.path().join("data");
    let flags = tls_flags(&certs, "node");
    let mut args: Vec<&str> =
        vec!["serve", "--listen", "127.0.0.1:0", "--bootstrap", "--data", data.to_str().unwrap()];
    args.extend(flags.iter().map(String::as_str));
    let mut child = h.cmd(&args).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("the node to listen", std::time::Duration::from_secs(20), || {
        read().contains("portmesh node listening")
    });
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, Signal::SIGHUP).unwrap();
    wait_until("the certificates to be re-read", std::time::Duration::from_secs(10), || {
        read().contains("TLS certificates re-read")
    });
    assert!(process_runs(child.id() as i32), "SIGHUP re-reads, it does not stop the node");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_cluster_from_the_cli_scopes_team_tokens_and_never_shows_a_token() {
    let home = Home::new();
    let certs = home.path().join("certs");
    home.pm(&["tls", "init", certs.to_str().unwrap()]).ok();

    // Tokens over plaintext would be readable on the path: --auth needs TLS.
    let data = home.path().join("plain");
    let plain = home.pm(&[
        "serve",
        "--auth",
        "--bootstrap",
        "--listen",
        "127.0.0.1:0",
        "--data",
        data.to_str().unwrap(),
    ]);
    assert_ne!(plain.code, 0);
    assert!(plain.stderr.contains("--auth needs TLS"), "{plain:?}");

    let mut flags = tls_flags(&certs, "node");
    flags.push("--auth".into());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let c = ProcCluster::start_in(home, 1, &flags, options(&certs));
    let admin_file = c.home.path().join("node0").join("admin.token");
    let admin_token = std::fs::read_to_string(&admin_file).unwrap().trim().to_string();
    let ca = certs.join("ca.pem");
    let seen = std::cell::RefCell::new(Vec::new());
    let run = |token: (&str, &str), args: &[&str]| {
        let out = c
            .home
            .cmd(args)
            .env("PORTMESH_NODE", &c.addrs[0])
            .env("PORTMESH_TLS_CA", &ca)
            .env(token.0, token.1)
            .output()
            .unwrap();
        let r = (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        );
        seen.borrow_mut().push(format!("{args:?}\n{}\n{}", r.1, r.2));
        r
    };
    let admin = ("PORTMESH_TOKEN_FILE", admin_file.to_str().unwrap());

    let (code, _, err) = run(admin, &["pools", "add", "p", "20760-20764", "--team", "teama"]);
    assert_eq!(code, 0, "{err}");
    // The token alone on stdout (what it is on stderr): the one place a secret is printed.
    let (code, member, err) = run(admin, &["--team", "teama", "token", "create"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("member token") && err.contains("for team teama"), "{err}");
    seen.borrow_mut().pop();
    let member = member.trim().to_string();
    let as_member = ("PORTMESH_TOKEN", member.as_str());

    let (code, port, err) = run(as_member, &["--team", "teama", "alloc", "web", "--pool", "p"]);
    assert_eq!(code, 0, "{err}");
    assert!((20760..=20764).contains(&port.trim().parse::<u16>().unwrap()), "{port}");
    let (code, _, err) = run(as_member, &["--team", "teamb", "ls"]);
    assert_ne!(code, 0);
    assert!(err.contains("acts for team \"teama\" only"), "{err}");
    let (code, _, err) = run(as_member, &["token", "ls"]);
    assert_ne!(code, 0);
    assert!(err.contains("needs an admin token"), "{err}");
    // The cool-down is the whole cluster's: a team's token may read it, not set it.
    let (code, _, err) = run(as_member, &["--team", "teama", "pools", "cooldown", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("needs an admin token"), "{err}");
    let (code, shown, err) = run(as_member, &["--team", "teama", "pools", "cooldown"]);
    assert_eq!((code, shown.trim()), (0, "1m"), "{err}");
    let (code, _, err) = run(("PORTMESH_NOTHING", ""), &["ls"]);
    assert_ne!(code, 0);
    assert!(err.contains("this cluster requires a token") && err.contains("PORTMESH_TOKEN"), "{err}");
    let (code, listed, err) = run(admin, &["token", "ls", "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let roles: Vec<&str> =
        listed["tokens"].as_array().unwrap().iter().map(|t| t["role"].as_str().unwrap()).collect();
    assert_eq!(roles.len(), 2, "{listed}");
    assert!(roles.contains(&"admin") && roles.contains(&"member"));
    let member_id = &member[4..20];
    let (code, _, err) = run(admin, &["token", "revoke", member_id]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(as_member, &["--team", "teama", "ls"]);
    assert_ne!(code, 0);
    assert!(err.contains(&format!("token {member_id} is not valid here")), "{err}");

    // Bad input: named, and nothing changes.
    let (code, _, err) = run(("PORTMESH_TOKEN", "pmt_a\nb"), &["ls"]);
    assert!(code != 0 && err.contains("holds characters no portmesh token has"), "{err}");
    let (code, _, err) = run(admin, &["token", "revoke", "0000000000000000"]);
    assert!(code != 0 && err.contains("unknown token \"0000000000000000\""), "{err}");
    let (code, _, err) = run(admin, &["token", "create", "--ttl", "0s"]);
    assert!(code != 0 && err.contains("a token lives at least 1s"), "{err}");
    let (code, _, err) = run(admin, &["token", "create", "--role", "join", "--uses", "5000"]);
    assert!(code != 0 && err.contains("uses: 5000 is too many"), "{err}");
    let (_, listed_after, _) = run(admin, &["token", "ls", "--json"]);
    let count =
        |v: &str| serde_json::from_str::<serde_json::Value>(v).unwrap()["tokens"].as_array().unwrap().len();
    assert_eq!(count(&listed_after), 1, "only the admin token is left: {listed_after}");

    // A planted token: no output above (but `token create`'s own line) and no line the node
    // logged holds either secret.
    let node = c.nodes[0].as_ref().unwrap();
    let mut logged = node.log.clone();
    logged.extend(node.later.lock().unwrap().iter().cloned());
    assert!(logged.iter().any(|l| l.contains("token created")), "the node logs what happens: {logged:#?}");
    for secret in [&member[21..], &admin_token[21..]] {
        for text in seen.borrow().iter().chain(&logged) {
            assert!(!text.contains(secret), "a token's secret was shown: {text}");
        }
    }
}

#[test]
fn a_laptop_joins_a_tls_cluster_with_tokens_by_join_token_and_keeps_its_tls_across_restarts() {
    let team = Home::new();
    let certs = team.path().join("certs");
    team.pm(&["tls", "init", certs.to_str().unwrap()]).ok();
    team.pm(&["tls", "init", certs.to_str().unwrap(), "--name", "laptop"]).ok();
    let data = team.path().join("team");
    let mut flags = tls_flags(&certs, "node");
    flags.extend(["--auth".into(), "--bootstrap".into()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = serve(&team, &data, &flags);
    let admin_file = data.join("admin.token");
    let (ca, cert, key) = (certs.join("ca.pem"), certs.join("laptop.pem"), certs.join("laptop.key"));
    let as_admin = |h: &Home, args: &[&str]| {
        let mut c = h.cmd(args);
        c.env("PORTMESH_TLS_CA", &ca).env("PORTMESH_TOKEN_FILE", &admin_file);
        Run::of(c.output().unwrap())
    };
    let team_status = || as_admin(&team, &["status", "--json", "--node", &node.grpc]).ok().json();
    let before = team_status();

    // The laptop's node certificate, by environment; the join token too.
    let laptop = Home::new();
    let solo = laptop.pm(&["status", "--json"]).ok().json();
    let join = |token: Option<&str>, cert_too: bool| {
        let mut c = laptop.cmd(&["join", &node.grpc]);
        c.env("PORTMESH_TLS_CA", &ca);
        if cert_too {
            c.env("PORTMESH_TLS_CERT", &cert).env("PORTMESH_TLS_KEY", &key);
        }
        if let Some(t) = token {
            c.env("PORTMESH_JOIN_TOKEN", t);
        }
        Run::of(c.output().unwrap())
    };
    // Without a node certificate, and without a join token: refused, named, nothing changed.
    join(None, false).fails_with("joining a TLS cluster needs this machine's node certificate");
    join(None, true)
        .fails_with("asks new members for a join token: pass --join-token or PORTMESH_JOIN_TOKEN");
    assert_eq!(laptop.pm(&["status", "--json"]).ok().json()["cluster_id"], solo["cluster_id"]);
    assert_eq!(team_status()["members"].as_array().unwrap().len(), 1);
    assert_eq!(team_status()["revision"], before["revision"]);

    let token = as_admin(&team, &["--node", &node.grpc, "token", "create", "--role", "join"]).ok();
    let token = token.stdout.trim().to_string();
    let out = join(Some(&token), true).ok();
    assert!(
        out.stdout.contains(&format!("joined cluster {}", before["cluster_id"].as_str().unwrap())),
        "{out:?}"
    );
    let launch = std::fs::read_to_string(laptop.path().join("launch.json")).unwrap();
    assert!(launch.contains("laptop.pem") && !launch.contains(&token[21..]), "{launch}");

    // The laptop's commands reach its node over TLS with its certificate, no flags; what they
    // do is the team's state.
    let port = laptop.pm(&["alloc", "shared"]).ok().ports()[0];
    let listed = as_admin(&team, &["ls", "--json", "--node", &node.grpc]).ok().json();
    assert!(listed["allocations"].as_array().unwrap().iter().any(|a| a["port"] == port), "{listed}");
    // A plaintext client is refused by the laptop's node: it serves TLS only.
    let addr = laptop.pm(&["status", "--json"]).ok().json()["addr"].as_str().unwrap().to_string();
    let plain = team.pm(&["--node", &addr, "ls"]);
    assert!(plain.code != 0 && plain.stderr.contains("requires TLS"), "{plain:?}");

    // A restart keeps the node, its address and its TLS.
    let was = laptop.pm(&["status", "--json"]).ok().json();
    laptop.pm(&["stop"]).ok();
    let again = laptop.pm(&["status", "--json"]).ok().json();
    assert_eq!((&again["node_id"], &again["addr"]), (&was["node_id"], &was["addr"]));
    assert_eq!(again["members"].as_array().unwrap().len(), 2);
    let log = std::fs::read_to_string(laptop.path().join("node.log")).unwrap();
    assert!(!log.contains(&token[21..]), "the join token's secret is in the node log");

    // Leaving through its own node: the team is back to one member, the laptop to plaintext.
    assert!(laptop.pm(&["leave"]).ok().stdout.contains("left cluster"));
    wait_until("the team to forget the laptop", std::time::Duration::from_secs(10), || {
        team_status()["members"].as_array().unwrap().len() == 1
    });
    let fresh = laptop.pm(&["status", "--json"]).ok().json();
    assert_ne!(fresh["cluster_id"], before["cluster_id"]);
    assert!(!laptop.path().join("launch.json").exists());
}
