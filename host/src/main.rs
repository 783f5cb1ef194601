//! The `node-runtime` binary: the command line on a tokio runtime. Each
//! command sets up its own logging (`telemetry`), since `serve` can only
//! do so once its configuration is read.

use std::process::ExitCode;

use clap::Parser;

use node_runtime::cli::{self, Cli};

fn main() -> ExitCode {
    // Before the heap grows: what is touched before stays in huge pages.
    node_runtime::sandbox::engine::no_transparent_huge_pages();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return cli::parse_error(&err),
    };
    node_runtime::support::tls::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(cli::Exit::Internal as u8);
        }
    };
    let code = runtime.block_on(cli::run(cli));
    // Dropping the runtime would wait for every blocking task, and a
    // compilation wasmtime cannot cancel may hold one for minutes after a
    // drain gave up on it: the command is done, so exit without it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
