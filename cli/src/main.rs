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

fn main() {
    let cli = args::Cli::parse();
    let serving = matches!(cli.command, args::Command::Serve(_));
    init_tracing(serving, cli.log_format);
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
    let code = match runtime.block_on(cmd::dispatch(cli)) {
        Ok(code) => code,
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
fn init_tracing(serving: bool, format: args::LogFormat) {
    let from_env =
        ["PORTMESH_LOG", "RUST_LOG"].iter().find_map(|v| std::env::var(v).ok().filter(|v| !v.is_empty()));
    let directive = match (from_env, serving) {
        (Some(d), _) => d,
        (None, true) => "info,openraft=warn,sled=warn".to_string(),
        (None, false) => return,
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directive)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        args::LogFormat::Json => builder.json().with_current_span(false).init(),
        args::LogFormat::Text => {
            builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init()
        }
    }
}
