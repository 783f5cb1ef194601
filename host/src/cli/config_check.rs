//! `node-runtime config check`: load a configuration exactly as `serve`
//! would (the file, then the environment) and print what the node would
//! run with, secrets redacted. A bad value is reported as `serve` would
//! report it, with exit code 2.

use std::path::PathBuf;

use super::{CommandError, Exit};
use crate::config::{self, NodeConfig};

#[derive(Debug, clap::Args)]
pub struct ConfigCheckArgs {
    /// The configuration file; the reference node's appsettings.json works
    /// as is. Environment variables (`NodeRuntime__NodeId=node-7`) apply
    /// over it.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

pub async fn run(args: ConfigCheckArgs) -> Result<Exit, CommandError> {
    let config = NodeConfig::load(&args.config, config::process_env())
        .map_err(|err| CommandError::usage(err.to_string()))?;
    // The certificate files are read as `serve` reads them.
    if config.mtls.enabled {
        super::serve::control_plane_tls(&config)?;
    }
    println!("{}", config.redacted_json());
    Ok(Exit::Completed)
}
