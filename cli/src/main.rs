//! `portmesh`: the one binary, client and node.

mod args;
mod commands;
mod local;

use clap::Parser;

fn main() {
    let cli = args::Cli::parse();
    let serving = matches!(cli.command, args::Command::Serve(_));
    init_tracing(serving);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(if serving { 2 } else { 1 })
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("portmesh: error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portmesh: error: {e:#}");
            1
        }
    };
    drop(runtime);
    std::process::exit(code);
}

/// Logs go to stderr. A node logs at `info` by default; client commands stay quiet unless
/// `PORTMESH_LOG` (an `EnvFilter` directive such as `debug` or `portmesh_api=trace`) says otherwise.
fn init_tracing(serving: bool) {
    let default = if serving { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},openraft=warn,sled=warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}
