//! The `node-runtime` binary: logging set-up, then the command line.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use node_runtime::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    node_runtime::control_plane::install_crypto_provider();
    // The demo's table is its output; its logs would only bury it.
    let quiet = matches!(&cli.command, cli::Command::Dev(args) if args.demo);
    let default_filter = if quiet { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(cli::Exit::Internal as u8);
        }
    };
    runtime.block_on(cli::run(cli))
}
