//! `portmesh serve`'s arguments: a node's listeners, cluster, TLS and tokens.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data directory.
    #[arg(long, env = "PORTMESH_DATA", default_value = "./portmesh-data")]
    pub data: PathBuf,
    /// gRPC listen address [default: 127.0.0.1:7400; with only PORT set, as container
    /// platforms do, 0.0.0.0:$PORT].
    #[arg(long, env = "PORTMESH_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// HTTP listen address for /healthz, /readyz and /api/v1/status.
    #[arg(long, env = "PORTMESH_HTTP")]
    pub http: Option<SocketAddr>,
    /// A host name the HTTP server answers to besides IP addresses, `localhost`, this host's
    /// name and the advertised host (repeat, or comma-separate in the variable). Browsers send
    /// the name they resolved; unknown names are refused (DNS rebinding).
    #[arg(long = "http-allow-host", env = "PORTMESH_HTTP_ALLOW_HOSTS", value_delimiter = ',')]
    pub http_allow_hosts: Vec<String>,
    /// Address to advertise to clients and peers (default: the bound gRPC address).
    #[arg(long, env = "PORTMESH_ADVERTISE")]
    pub advertise: Option<String>,
    /// Start a new single-node cluster if the data directory holds none.
    #[arg(long, env = "PORTMESH_BOOTSTRAP", conflicts_with = "join")]
    pub bootstrap: bool,
    /// Join the cluster of the member at ADDR if the data directory holds none (a restarted
    /// member rejoins by itself; the flag is then ignored).
    #[arg(long, env = "PORTMESH_JOIN")]
    pub join: Option<String>,
    /// Joining nodes become voters while the cluster has fewer voters than this; the rest stay
    /// learners.
    #[arg(long, env = "PORTMESH_VOTERS", default_value_t = 3, value_parser = parse_voters)]
    pub voters: usize,
    /// The cluster's well-known members, by the addresses they advertise (HOST:PORT, repeat or
    /// comma-separate): a StatefulSet's first pods. With no cluster in the data directory and
    /// neither --bootstrap nor --join, the first seed creates the cluster once no other seed
    /// holds one, and every other node joins a seed that does; a node that is not a seed leaves
    /// the cluster when it stops and empties its data directory (docs/deployment.md).
    #[arg(long, env = "PORTMESH_SEEDS", value_delimiter = ',', value_parser = parse_seed,
          conflicts_with_all = ["bootstrap", "join"])]
    pub seeds: Vec<String>,
    /// Take a snapshot of the state (and purge the log behind it) every this many log entries.
    #[arg(long, env = "PORTMESH_SNAPSHOT_EVERY", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub snapshot_every: u64,
    /// Take a snapshot also once the log written since the last one passes this many MiB (0: by
    /// entries only). Lease checkpoints are large entries: this keeps a node that mostly keeps
    /// leases alive from growing its log (and memory) for hours before it reaches --snapshot-every.
    #[arg(long, env = "PORTMESH_SNAPSHOT_LOG_MIB", default_value_t = 4)]
    pub snapshot_log_mib: u64,
    /// Record this node's addresses in DIR/node.json so local CLIs find it.
    #[arg(long)]
    pub home: Option<PathBuf>,
    /// The name of this node's host as clients name it when they allocate (the node probes ports
    /// for allocations on this host) [default: the OS host name].
    #[arg(long, env = "PORTMESH_HOST_NAME")]
    pub host_name: Option<String>,
    /// Require a client certificate signed by --tls-ca from every client (members always need a
    /// node certificate to speak Raft, join or probe).
    #[arg(long, env = "PORTMESH_MTLS")]
    pub mtls: bool,
    /// Serve plaintext on a non-loopback address (a network where everyone is trusted). Without
    /// it, such a node needs --tls-cert, --tls-key and --tls-ca.
    #[arg(long, env = "PORTMESH_INSECURE")]
    pub insecure: bool,
    /// Ask every caller for a token (needs TLS). With --bootstrap, the first admin token is
    /// written to DATA/admin.token (0600), once.
    #[arg(long, env = "PORTMESH_AUTH")]
    pub auth: bool,
    /// The join token (`portmesh token create --role join`) a node joining a cluster with
    /// authentication presents (with --join or --seeds). The node that creates the cluster
    /// (--bootstrap, or the first seed) with --auth registers it instead, as a standing join
    /// token (no expiry, no use limit): one Secret for every pod. Prefer PORTMESH_JOIN_TOKEN: a
    /// flag shows in `ps`.
    #[arg(long, env = "PORTMESH_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// A file holding the first admin token of a cluster this node creates with --auth (made
    /// with `portmesh token mint`, e.g. kept in a Secret) [default: one is made and written to
    /// DATA/admin.token].
    #[arg(long, env = "PORTMESH_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// `--seeds`: HOST:PORT, as the seed advertises itself.
fn parse_seed(s: &str) -> Result<String, String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {
            Ok(s.to_string())
        }
        _ => Err(format!(
            "{s:?} is not HOST:PORT (a seed's advertised address, e.g. portmesh-0.portmesh:7400)"
        )),
    }
}

/// `--voters`: Raft clusters of 3 or 5 voters tolerate 1 or 2 failures.
fn parse_voters(s: &str) -> Result<usize, String> {
    match s {
        "3" => Ok(3),
        "5" => Ok(5),
        _ => Err(format!("{s:?}: a cluster has 3 or 5 voters")),
    }
}
