//! `node-runtime config check`: load a configuration exactly as `serve`
//! would (the file, its environment's file, then the environment
//! variables) and print what the node would run with, secrets redacted.
//! Which files were read, and what was deliberately not, are `note:` lines
//! on stderr, so that stdout stays a configuration. A bad value is
//! reported as `serve` would report it, with exit code 2.

use std::path::PathBuf;

use super::{CommandError, Exit};
use crate::app;
use crate::telemetry::LogFormat;

#[derive(Debug, clap::Args)]
pub struct ConfigCheckArgs {
    /// The configuration file; the reference node's appsettings.json works
    /// as is. Its environment's file beside it (appsettings.Development.json
    /// with DOTNET_ENVIRONMENT=Development) and then environment variables
    /// (`NodeRuntime__NodeId=node-7`) apply over it.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

pub async fn run(args: ConfigCheckArgs) -> Result<Exit, CommandError> {
    let config =
        app::load_config(Some(&args.config), LogFormat::Human).map_err(|err| CommandError::usage(err.to_string()))?;
    say_err!("note: {}", config.sources);
    // The certificate files are read as `serve` reads them.
    if config.mtls.enabled {
        app::control_plane_tls(&config).map_err(|err| CommandError::usage(format!("invalid configuration: {err}")))?;
    } else {
        let mtls = &config.mtls;
        let unread: Vec<&str> = [
            ("MTls.ClientCertificatePath", &mtls.client_certificate_path),
            ("MTls.ClientKeyPath", &mtls.client_key_path),
            ("MTls.ServerCaCertificatePath", &mtls.server_ca_certificate_path),
        ]
        .into_iter()
        .filter_map(|(key, path)| path.as_ref().map(|_| key))
        .collect();
        if !unread.is_empty() {
            eprintln!(
                "note: MTls.Enabled is false, so the files {} name are not read or checked",
                unread.join(", ")
            );
        }
    }
    println!("{}", support::one_line::escape_json(&config.redacted_json()));
    Ok(Exit::Completed)
}
