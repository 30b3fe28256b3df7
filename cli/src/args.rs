//! Command-line arguments. Parsing only; `cmd` runs them.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod serve;
pub use serve::ServeArgs;

/// Hands out TCP ports so that nothing collides: local apps, a team's machines, CI shards.
///
/// With no --node and no PORTMESH_NODE, commands talk to this machine's local node and start it
/// in the background if none runs (data under PORTMESH_HOME, else the user data directory).
#[derive(Debug, Parser)]
#[command(name = "portmesh", version, about, max_term_width = 100)]
pub struct Cli {
    /// Address of the node to talk to (host:port).
    #[arg(long, global = true, env = "PORTMESH_NODE")]
    pub node: Option<String>,
    /// Team whose pools and leases to use [default: "default", or a project file's team].
    #[arg(long, global = true, env = "PORTMESH_TEAM")]
    pub team: Option<String>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// The CA that signed the cluster's certificates: talk TLS to `--node` (for `serve`: the CA
    /// whose members and clients this node trusts).
    #[arg(long, global = true, env = "PORTMESH_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate, for clusters that require one (`serve --mtls`); for `serve`:
    /// the node's certificate.
    #[arg(long, global = true, env = "PORTMESH_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert.
    #[arg(long, global = true, env = "PORTMESH_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The token to call a cluster that runs with authentication (`serve --auth`). Prefer
    /// PORTMESH_TOKEN or --token-file: a flag's value shows in the process list.
    #[arg(long, global = true, env = "PORTMESH_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// A file holding the token (e.g. a node's DATA/admin.token).
    #[arg(long, global = true, env = "PORTMESH_TOKEN_FILE", value_name = "FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Log lines (stderr) as text or as one JSON object each. Which lines: PORTMESH_LOG or
    /// RUST_LOG (e.g. `debug`, `portmesh_api=trace`); `info` for `serve`, none otherwise.
    #[arg(long, global = true, env = "PORTMESH_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token and print it (the only time it is shown). A member token acts on one team
    /// (--team); an admin token on everything; a join token lets nodes join (`serve --join ADDR
    /// --join-token T`).
    Create {
        /// member, admin or join.
        #[arg(long, default_value = "member", value_parser = ["member", "admin", "join"])]
        role: String,
        /// Short for --role join.
        #[arg(long, conflicts_with = "role")]
        join: bool,
        /// Lifetime, e.g. 90d [default: none; join tokens 24h].
        #[arg(long, value_parser = parse_token_ttl)]
        ttl: Option<Duration>,
        /// How many nodes a join token lets in [default: 1].
        #[arg(long)]
        uses: Option<u32>,
    },
    /// Print a new token without asking a node: for a cluster set up from Secrets, where the
    /// node that creates it registers `serve --admin-token-file` as its first admin token and
    /// `--join-token` as a standing join token (docs/deployment.md, "Kubernetes").
    Mint,
    /// List tokens (never their secrets).
    Ls,
    /// Revoke a token by id: calls with it are refused from now on.
    Revoke { id: String },
}

/// `token create --ttl`: a lifetime, at least a second.
fn parse_token_ttl(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d < Duration::from_secs(1) => {
            Err("a token lives at least 1s: leave --ttl out for no expiry".into())
        }
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{s:?}: {e} (write e.g. 12h, 90d)")),
    }
}

#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Make a CA (or use the one already in DIR) and issue a node certificate for the given
    /// names and addresses, and a client certificate: DIR/ca.pem, ca.key, NAME.pem, NAME.key,
    /// client.pem, client.key. Run it again with another --name to add a node; the files it
    /// replaces are picked up by running nodes by themselves.
    Init {
        /// Where to write the files (created 0700; keys are 0600).
        dir: PathBuf,
        /// A DNS name the node certificate is valid for (repeat). `localhost` is always included.
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// An IP address the node certificate is valid for (repeat). 127.0.0.1 and ::1 are always included.
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<std::net::IpAddr>,
        /// The node certificate's file name: DIR/NAME.pem and DIR/NAME.key.
        #[arg(long, default_value = "node", value_parser = parse_file_stem)]
        name: String,
        /// How long the node and client certificates are valid.
        #[arg(long, default_value = "365d", value_parser = parse_validity)]
        valid_for: Duration,
    },
}

/// `tls init --name`: a plain file name, no directories.
fn parse_file_stem(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !s.starts_with('.');
    if ok {
        Ok(s.to_string())
    } else {
        Err("a file name of letters, digits, '-', '_' and '.' (at most 64)".into())
    }
}

/// `tls init --valid-for`: a day to ten years.
fn parse_validity(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d >= Duration::from_secs(86_400) && d <= Duration::from_secs(3650 * 86_400) => Ok(d),
        Ok(_) => Err("between 1d and 3650d".into()),
        Err(e) => Err(format!("{s:?}: {e} (write e.g. 365d)")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Cli {
    /// The team commands act for.
    pub fn team(&self) -> &str {
        portmesh_core::team_or_default(self.team.as_deref().unwrap_or_default())
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Allocate port(s); prints one port per line.
    Alloc(AllocArgs),
    /// Release ports, a sticky key's port, or everything attached to a lease.
    Release(ReleaseArgs),
    /// Renew a lease once, or with --keep for as long as standard input stays open.
    Renew {
        /// Lease id.
        #[arg(long)]
        lease: u64,
        /// Keep renewing (every third of the TTL) until standard input closes, then revoke the
        /// lease: a program holds ports for its lifetime by keeping this running on a pipe, and
        /// the ports come back when it ends, however it ends. Exits 1 if the lease is lost.
        #[arg(long)]
        keep: bool,
    },
    /// List live allocations and reservations.
    Ls {
        /// Only this pool.
        #[arg(long)]
        pool: Option<String>,
        /// Show allocations of every team.
        #[arg(long)]
        all_teams: bool,
        /// Read this node's state without confirming with the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Keep a port out of automatic selection.
    Reserve {
        port: u16,
        /// Why (shown in listings).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// End a reservation.
    Unreserve { port: u16 },
    /// Probe ports on this host: free or busy, and who holds them. Exits 1 if any is busy.
    Check {
        #[arg(required = true)]
        ports: Vec<u16>,
    },
    /// List, add or remove pools.
    #[command(subcommand)]
    Pools(PoolsCommand),
    /// Show the node: id, leader, term, members with roles, commit and applied index.
    Status,
    /// Ask the node's gRPC health service (no token needed; plaintext is answered even by a TLS
    /// node): exits 0 when SERVING, 1 otherwise. For container HEALTHCHECKs and exec probes.
    Health {
        /// The health name: `portmesh` (part of a cluster with a leader, the default) or `""`.
        #[arg(long, default_value = "portmesh")]
        service: String,
    },
    /// Run a node in the foreground.
    Serve(ServeArgs),
    /// Shut the local node (or the one at --node) down gracefully.
    Stop,
    /// The audit log: every assignment, release, expiry and conflict still in the history
    /// (the latest 10,000 events), oldest first, with the port's holder and host.
    Log {
        /// Keep following new entries until interrupted.
        #[arg(long)]
        follow: bool,
        /// Entries of every team, not only --team.
        #[arg(long)]
        all_teams: bool,
    },
    /// Follow every change (allocations, releases, expiries, reservations, pools, leases,
    /// conflicts) as it happens, one line each, until interrupted.
    Watch {
        /// Start from this revision (history first). Default: only changes from now on.
        #[arg(long)]
        from: Option<u64>,
        /// Only this pool.
        #[arg(long)]
        pool: Option<String>,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// Changes of every team, not only --team.
        #[arg(long)]
        all_teams: bool,
    },
    /// Usage per pool (in use, peak, churn, time to exhaustion), the most contested ports and who
    /// held them, and recommendations with the command that applies each.
    Stats {
        /// Every team, not only --team.
        #[arg(long)]
        all_teams: bool,
    },
    /// Check this host and the cluster for what could bite: pools in the ephemeral range,
    /// ports held with no lease or by processes that are gone, an unreachable or leaderless
    /// cluster, clock skew, the data directory's size. Exits 1 if anything is wrong.
    Doctor,
    /// Certificates for a TLS cluster.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Print a shell completion script: `portmesh completions bash > /etc/bash_completion.d/portmesh`
    /// (zsh: into a directory of `$fpath` as `_portmesh`; fish: `~/.config/fish/completions/`).
    Completions { shell: clap_complete::Shell },
    /// Tokens of a cluster that runs with authentication (`serve --auth`; admin token needed).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Register a service: where it listens and how to check it. Prints its id.
    Register(RegisterArgs),
    /// Remove a service registration.
    Deregister {
        /// The registration's id (as `register` printed it, or from `discover --all`).
        id: String,
    },
    /// Find services: one line per service with its host, ports and health. Only healthy ones
    /// (passing or warning) unless --all.
    Discover {
        /// Service name (default: every service).
        name: Option<String>,
        /// Only this project.
        #[arg(long)]
        project: Option<String>,
        /// Only this environment.
        #[arg(long)]
        env: Option<String>,
        /// Only services carrying this tag (repeat for several: all must match).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Also list services that are critical or not checked yet.
        #[arg(long)]
        all: bool,
        /// Services of every team, not only --team.
        #[arg(long)]
        all_teams: bool,
        /// Read this node's state without confirming with the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Make this machine's local node a member of the team cluster that the node at ADDR belongs
    /// to. The local node's own data is moved aside (kept), since it belongs to another cluster.
    Join {
        /// Any member of the team cluster (`host:port` of its gRPC endpoint).
        addr: String,
        /// Where the local node listens for the other members and clients [default: this
        /// machine's address towards ADDR, with a port picked once and then kept].
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// The address the other members use to reach this node, if not the listen address
        /// (behind NAT, or when listening on 0.0.0.0).
        #[arg(long)]
        advertise: Option<String>,
        /// The join token (`portmesh token create --role join`) a cluster with authentication
        /// asks a new member for. Prefer PORTMESH_JOIN_TOKEN: a flag shows in `ps`. A TLS
        /// cluster also needs --tls-ca, --tls-cert and --tls-key: this machine's node certificate.
        #[arg(long, env = "PORTMESH_JOIN_TOKEN", hide_env_values = true)]
        join_token: Option<String>,
    },
    /// Run a server on port(s) held for it: allocate under a lease, register it, start CMD with
    /// PORT set and {port} replaced in its arguments, keep the lease alive, pass signals on,
    /// release when it exits, and exit with its status.
    Run(RunArgs),
    /// Start a project's stack (portmesh.toml): every port in one batch, then each service once
    /// what it depends on is healthy; on any failure, stop what started and release everything.
    Up(UpArgs),
    /// Stop a project's stack started with `up --detach` (or running in another terminal).
    Down(ProjectArgs),
    /// List a project's services with their ports, pids and health.
    Ps(ProjectArgs),
    /// Print a running stack's variables as shell `export` lines (eval "$(portmesh env)").
    Env(ProjectArgs),
    /// Project files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Write a commented portmesh.toml for the project in this directory: its Flask app (an app
    /// factory or a module-level app), and a Redis or PostgreSQL service when requirements.txt
    /// or pyproject.toml names one.
    Init {
        /// Replace an existing portmesh.toml.
        #[arg(long)]
        force: bool,
    },
    /// Remove this machine's local node (or the node at --node) from its cluster cleanly: the
    /// node is removed from the membership, stopped, and its data moved aside; the next command
    /// starts a fresh single-node local node. With --id, remove that member instead (e.g. a
    /// machine that is gone for good) and touch nothing local.
    Leave {
        /// The id of a member to remove (see `portmesh status`).
        #[arg(long)]
        id: Option<u64>,
    },
}

/// Where a port comes from and what to do when the wanted one is taken (`alloc` and `run`).
#[derive(Debug, Clone, Args)]
pub struct PortArgs {
    /// Pool to draw from [default: the pool holding --port, else the pool named like the
    /// service, else default].
    #[arg(long)]
    pub pool: Option<String>,
    /// Wanted port (of the first port). Leave it out for any port of the pool.
    #[arg(long, value_parser = parse_wanted_port)]
    pub port: Option<u16>,
    /// What to do if the wanted port is not free: sticky, next, random or fail.
    #[arg(long, default_value = "sticky")]
    pub strategy: portmesh_core::Strategy,
    /// Sticky key: the same key gets the same port back (several ports: the key suffixed /0, /1,
    /// … for `alloc --count`, /NAME for `run --ports`). `run` defaults to PROJECT/SERVICE
    /// (PROJECT: PORTMESH_PROJECT, else the working directory's name).
    #[arg(long)]
    pub key: Option<String>,
    /// Instance name.
    #[arg(long)]
    pub instance: Option<String>,
    /// Environment name.
    #[arg(long)]
    pub env: Option<String>,
}

#[derive(Debug, Args)]
pub struct AllocArgs {
    /// Service name. Without --pool, a pool named like the service is used if there is one.
    pub service: Option<String>,
    #[command(flatten)]
    pub want: PortArgs,
    /// How many ports (one atomic batch).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub count: u32,
    /// Attach to a new lease with this TTL (e.g. 30s, 5m): the ports come back if it is not renewed.
    #[arg(long, value_parser = parse_ttl)]
    pub ttl: Option<Duration>,
    /// Attach to an existing lease.
    #[arg(long, conflicts_with = "ttl")]
    pub lease: Option<u64>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Service name [default: the command's file name].
    #[arg(long)]
    pub service: Option<String>,
    #[command(flatten)]
    pub want: PortArgs,
    /// Names of the ports to hold, comma-separated; the first is PORT [default: one port, main].
    #[arg(long, value_delimiter = ',')]
    pub ports: Vec<String>,
    /// Lease TTL: if this wrapper dies, the ports come back this long after.
    #[arg(long, default_value = "10s", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Bind the (first) port here and hand the socket over as fd 3 by the systemd
    /// socket-activation protocol (LISTEN_FDS, LISTEN_PID), e.g. `gunicorn --bind fd://3`.
    #[arg(long)]
    pub fd: bool,
    /// The address --fd binds.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
    /// Health check for the registration: tcp, http:/PATH, grpc[:SERVICE] or cmd:COMMAND.
    #[arg(long)]
    pub check: Option<portmesh_core::CheckKind>,
    /// Project of the registration.
    #[arg(long)]
    pub project: Option<String>,
    /// A tag for the registration (repeat for several).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Which project, environment and instance.
#[derive(Debug, Args, Clone)]
pub struct ProjectArgs {
    /// The project file [default: portmesh.toml here or in the nearest parent directory].
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Environment: a [env.NAME] section and its defaults [default: PORTMESH_ENV, else dev].
    #[arg(long)]
    pub env: Option<String>,
    /// Instance: a copy of the project with its own ports [default: PORTMESH_INSTANCE, else none].
    #[arg(long)]
    pub instance: Option<String>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub project: ProjectArgs,
    /// End whatever holds a wanted port (SIGTERM, then SIGKILL; a container publishing it is
    /// stopped), wait until it is free, then start.
    #[arg(long)]
    pub force: bool,
    /// Stop an earlier `up` of the same project and instance first.
    #[arg(long)]
    pub kill_existing: bool,
    /// Return once the stack is healthy and leave it running (stop it with `portmesh down`).
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Internal: run as the supervisor of a detached stack.
    #[arg(long, hide = true)]
    pub supervise: bool,
    /// Internal: the pipe a supervisor reports to its `up --detach` on ("up", or why not).
    #[arg(long, hide = true, requires = "supervise")]
    pub report_fd: Option<i32>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the resolved project file, each value with the layer it came from.
    Show(ProjectArgs),
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Service name.
    pub name: String,
    /// A port: PORT, NAME=PORT or NAME=PORT/PROTOCOL (repeat for several; the first is the main
    /// one) [default name: main].
    #[arg(long = "port", required = true, value_parser = parse_service_port)]
    pub ports: Vec<(String, u16, String)>,
    /// Registration id [default: NAME@HOST:PORT].
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long)]
    pub project: Option<String>,
    #[arg(long)]
    pub env: Option<String>,
    #[arg(long)]
    pub instance: Option<String>,
    /// A tag (repeat for several).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Health check, run by the node on the service's host: tcp, http:/PATH, grpc[:SERVICE] or
    /// cmd:COMMAND (run with sh -c, PORT set; exit status 0 passes).
    #[arg(long)]
    pub check: Option<portmesh_core::CheckKind>,
    /// Which named port the check targets [default: the first].
    #[arg(long)]
    pub check_port: Option<String>,
    /// Time between checks [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub interval: Option<Duration>,
    /// Time one check may take [default: 2s, or the interval if shorter].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Consecutive failures before the service is critical.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub failures: u32,
    /// Attach to this lease: the registration goes when the lease ends.
    #[arg(long)]
    pub lease: Option<u64>,
    /// The host it runs on [default: the host of the node the CLI talks to].
    #[arg(long)]
    pub host: Option<String>,
    /// Services it depends on (informational; repeat for several).
    #[arg(long = "depends-on")]
    pub depends_on: Vec<String>,
}

fn parse_service_port(s: &str) -> Result<(String, u16, String), String> {
    let (name, rest) = s.split_once('=').unwrap_or(("main", s));
    let (port, proto) = rest.split_once('/').unwrap_or((rest, ""));
    let port: u16 =
        port.parse().map_err(|_| format!("{s:?}: write PORT, NAME=PORT or NAME=PORT/PROTOCOL"))?;
    Ok((name.to_string(), port, proto.to_string()))
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["ports", "key", "lease"])))]
pub struct ReleaseArgs {
    pub ports: Vec<u16>,
    /// Release the live allocation of this sticky key.
    #[arg(long)]
    pub key: Option<String>,
    /// Revoke this lease, releasing everything attached.
    #[arg(long)]
    pub lease: Option<u64>,
    /// Release it even if a running process holds it under a lease (`up`, `run`): the process
    /// keeps listening on a port portmesh may then hand to someone else.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum PoolsCommand {
    /// List pools with their usage.
    Ls,
    /// Add a pool: RANGE is START-END, or several joined by commas.
    Add { name: String, range: String },
    /// Remove an empty pool.
    Rm { name: String },
    /// Show the cool-down after release, or set it for the whole cluster (admin): how long a
    /// released port stays out of reach of every key but the one that held it. 0 turns it off.
    Cooldown {
        /// New cool-down, e.g. 30s, 2m, 0 (at most 24h)
        #[arg(value_parser = parse_cooldown)]
        duration: Option<Duration>,
    },
}

/// A cool-down: a duration in whole milliseconds (the node refuses more than a day).
fn parse_cooldown(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.subsec_nanos() % 1_000_000 != 0 => Err(format!("{s:?}: give whole milliseconds")),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{s:?}: {e} (write e.g. 30s, 2m, or 0 to turn it off)")),
    }
}

/// `--port`: a real port. 0 would silently mean "any port", which leaving the flag out says.
fn parse_wanted_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) => Err("0 is not a port: leave --port out to take any port of the pool".into()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("{s:?} is not a port (1-65535)")),
    }
}

/// `--ttl`: a lease's time to live. Zero would mean "no lease" on the wire, a permanent
/// allocation the user asked to expire.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("a lease of 0 would never expire: leave --ttl out for no lease".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{s:?}: {e} (write e.g. 30s, 5m)")),
    }
}
