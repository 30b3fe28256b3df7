//! `portmesh join` and `portmesh leave`: a machine's local node moves into a team cluster, keeps
//! its membership and address across restarts, and leaves it cleanly.

use crate::support::*;

fn cluster_of(h: &Home, node: Option<&str>) -> serde_json::Value {
    let mut args = vec!["status", "--json"];
    if let Some(n) = node {
        args.extend(["--node", n]);
    }
    h.pm(&args).ok().json()
}

#[test]
fn join_and_leave_move_a_machines_local_node_into_a_team_cluster_and_out_again() {
    let team_home = Home::new();
    let team = serve(&team_home, &team_home.path().join("team"), &["--bootstrap"]);
    let team_id = cluster_of(&team_home, Some(&team.grpc))["cluster_id"].as_str().unwrap().to_string();
    assert_eq!(team_id.len(), 16);

    // A laptop whose local node already holds an allocation of its own single-node cluster.
    let laptop = Home::new();
    laptop.pm(&["alloc", "solo"]).ok();
    let solo = cluster_of(&laptop, None);
    assert_ne!(solo["cluster_id"], team_id);

    // Joining an address where nothing answers names it and changes nothing.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    laptop.pm(&["join", &closed]).fails_with(&format!("cannot reach a portmesh node at {closed}"));
    assert_eq!(cluster_of(&laptop, None)["cluster_id"], solo["cluster_id"]);

    let out = laptop.pm(&["join", &team.grpc]).ok();
    assert!(out.stdout.contains(&format!("joined cluster {team_id} as node")), "{out:?}");
    let kept: Vec<_> = std::fs::read_dir(laptop.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("data.before-join-"))
        .collect();
    assert_eq!(kept.len(), 1, "the single-node data is kept aside");
    let member = cluster_of(&laptop, None);
    assert_eq!(member["cluster_id"], team_id);
    assert_eq!(member["members"].as_array().unwrap().len(), 2, "{member}");
    assert_ne!(member["node_id"], solo["node_id"], "a new node: its old identity stays with the old data");

    // One shared state: an allocation through the laptop is on the team node, and the team's
    // allocations are not handed out again.
    let shared = laptop.pm(&["alloc", "shared"]).ok().ports()[0];
    let team_ls = team_home.pm(&["ls", "--json", "--node", &team.grpc]).ok().json();
    assert!(team_ls["allocations"].as_array().unwrap().iter().any(|a| a["port"] == shared), "{team_ls}");

    // A restart (any command after stop) rejoins with the same id and address, no flags.
    laptop.pm(&["stop"]).ok();
    let again = cluster_of(&laptop, None);
    assert_eq!(
        (&again["node_id"], &again["addr"], &again["cluster_id"]),
        (&member["node_id"], &member["addr"], &member["cluster_id"])
    );
    assert!(laptop.pm(&["join", &team.grpc]).ok().stdout.contains("already a member"));

    // Leaving: the team is back to one member, the laptop to a fresh cluster of its own.
    let out = laptop.pm(&["leave"]).ok();
    assert!(out.stdout.contains(&format!("left cluster {team_id}")), "{out:?}");
    wait_until("the team to forget the laptop", std::time::Duration::from_secs(10), || {
        cluster_of(&team_home, Some(&team.grpc))["members"].as_array().unwrap().len() == 1
    });
    let fresh = cluster_of(&laptop, None);
    assert_eq!(fresh["members"].as_array().unwrap().len(), 1);
    assert_ne!(fresh["cluster_id"], team_id);
    assert!(laptop.pm(&["ls", "--json"]).ok().json()["allocations"].as_array().unwrap().is_empty());
    // The last member of a cluster has nothing to leave.
    laptop.pm(&["leave"]).fails_with("is the only member of cluster");
    assert_eq!(cluster_of(&laptop, None)["cluster_id"], fresh["cluster_id"]);
}
