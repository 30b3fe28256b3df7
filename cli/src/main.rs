//! `portmesh`: the one binary, client and node.
//!
//! Layers, top down (nothing points back up):
//! - `args`: the command line, parsed by clap; no behaviour.
//! - `cmd`: the one dispatch and a module per command family.
//! - `stack`: the machinery of a project's stack (`up`, `down`, `ps`, `env`).
//! - `render`: pb values as text or JSON; `requests`: requests built from arguments.
//! - `node`: the client of a node, and the embedded local node; `process`: process control.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

mod args;
mod cmd;
mod node;
mod process;
mod render;
mod requests;
mod stack;

use clap::Parser;
use tracing_subscriber::prelude::*;

fn main() {
    let cli = args::Cli::parse();
    let serving = matches!(cli.command, args::Command::Serve(_));
    init_tracing(serving, cli.log_format);
    if serving {
        portmesh_node::configure_allocator();
    }
    // A node gets a multi-threaded runtime; a one-shot client command a single thread, which
    // starts faster.
    let runtime = if serving {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("portmesh: error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    // Errors as JSON for programs: with --json, or PORTMESH_ERROR_FORMAT=json when a program
    // reads the plain answer but wants the error's category (the Python package's fast path).
    let json = cli.json || std::env::var_os("PORTMESH_ERROR_FORMAT").is_some_and(|v| v == "json");
    let code = match runtime.block_on(cmd::dispatch(cli)) {
        Ok(code) => code,
        Err(e) if json => {
            // For programs (the Python package): the message and its category, one JSON line.
            eprintln!("{}", serde_json::json!({"error": format!("{e:#}"), "kind": error_kind(&e)}));
            1
        }
        Err(e) => {
            eprintln!("portmesh: error: {e:#}");
            1
        }
    };
    drop(runtime);
    std::process::exit(code);
}

/// Logs go to stderr, as text or JSON lines. A node logs at `info` by default; client commands
/// log nothing unless `PORTMESH_LOG` or `RUST_LOG` (an `EnvFilter` directive such as `debug` or
/// `portmesh_api=trace`) asks, which also keeps a one-shot command from paying for building a
/// filter.
/// The category of a failed command, as `--json` reports it: the node's (`exhausted`,
/// `not_found`, `failed_precondition`, ...), `unreachable` when no node answered, `error` for
/// anything else (bad arguments, files).
fn error_kind(e: &anyhow::Error) -> String {
    use portmesh_client::ClientError;
    let client = e.chain().find_map(|c| c.downcast_ref::<ClientError>());
    match client {
        Some(c) if c.kind().is_some() => c.kind().unwrap_or_default().to_string(),
        Some(ClientError::Unreachable { .. } | ClientError::NoAnswer { .. }) => "unreachable".into(),
        Some(ClientError::Status { code, .. }) => format!("{code:?}").to_lowercase(),
        _ => "error".into(),
    }
}

fn init_tracing(serving: bool, format: args::LogFormat) {
    let from_env =
        ["PORTMESH_LOG", "RUST_LOG"].iter().find_map(|v| std::env::var(v).ok().filter(|v| !v.is_empty()));
    let quiet = serving && from_env.is_none();
    let directive = match (from_env, serving) {
        (Some(d), _) => d,
        (None, true) => "info,openraft=warn,sled=warn".to_string(),
        (None, false) => return,
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directive)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Unless a filter was asked for: without openraft's per-attempt lines about an unreachable
    // peer (see `retry_noise`); the network layer logs one line when a member goes and one when
    // it is back.
    let noise = tracing_subscriber::filter::filter_fn(move |m| !(quiet && retry_noise(m)));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false);
    let registry = tracing_subscriber::registry().with(filter).with(noise);
    match format {
        args::LogFormat::Json => registry.with(fmt.json().with_current_span(false)).init(),
        args::LogFormat::Text => {
            registry.with(fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))).init()
        }
    }
}

/// openraft 0.9.25's log events that repeat for every attempt while a peer is unreachable (five
/// lines every 200 ms, and an ERROR per linearizable read): replication errors, heartbeat
/// progress, back-off, and a leadership confirmation that one voter missed. Storage errors in
/// the same modules are other lines and stay. The lines are those of the pinned openraft
/// (`=0.9.25`); the end-to-end test `a_member_down_is_one_log_line_not_one_per_request` fails
/// if an upgrade moves them.
fn retry_noise(m: &tracing::Metadata<'_>) -> bool {
    const NOISE: &[(&str, u32)] = &[
        ("src/replication/mod.rs", 258),
        ("src/replication/mod.rs", 284),
        ("src/replication/mod.rs", 596),
        ("src/engine/handler/replication_handler/mod.rs", 287),
        ("src/engine/handler/replication_handler/mod.rs", 294),
        ("src/core/raft_core.rs", 383),
    ];
    m.target().starts_with("openraft")
        && match (m.file(), m.line()) {
            (Some(file), Some(line)) => NOISE.iter().any(|(f, l)| *l == line && file.ends_with(f)),
            _ => false,
        }
}
