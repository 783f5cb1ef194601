//! `node-runtime push` and `node-runtime pull`: an agent to and from an OCI
//! registry, in the layout `wkg` and `oci-wasm` use, so nodes configured
//! with an OCI source can run it.
//!
//! `push` checks the file is a component first (a core module or random
//! bytes never reach the registry) and prints the digest that pins it in a
//! lease (`agent.digest`). `pull` saves only a component: a `.cwasm`
//! (native code) from a registry is refused as the node refuses it, so it
//! does not end up in an agents directory, where native code is trusted.
//! Credentials come from the environment (`NODE_RUNTIME_REGISTRY_USERNAME`,
//! `NODE_RUNTIME_REGISTRY_PASSWORD`), never from a flag, so a password
//! stays out of shell history.

use std::path::PathBuf;

use clap::Args;

use super::{CommandError, Exit, read_agent_file};
use crate::agent_store::AgentDigest;
use crate::agent_store::oci_source::{registry_auth, registry_client};
use crate::sandbox::artifact_trust::check_network_artifact;
use crate::sandbox::signature::TrustedKeys;

const USERNAME_VAR: &str = "NODE_RUNTIME_REGISTRY_USERNAME";
const PASSWORD_VAR: &str = "NODE_RUNTIME_REGISTRY_PASSWORD";

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The component to publish (.wasm).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Where to: REGISTRY/REPOSITORY:TAG, e.g. 127.0.0.1:5000/agents/echo:1.0.0.
    #[arg(value_name = "REFERENCE")]
    pub reference: String,
    /// Speak plain HTTP to the registry (for a registry on loopback).
    #[arg(long)]
    pub insecure: bool,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// What to fetch: REGISTRY/REPOSITORY:TAG (or @sha256:...).
    #[arg(value_name = "REFERENCE")]
    pub reference: String,
    /// Where to write the component.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Speak plain HTTP to the registry (for a registry on loopback).
    #[arg(long)]
    pub insecure: bool,
}

fn credentials() -> Result<Option<(String, String)>, CommandError> {
    match (std::env::var(USERNAME_VAR).ok(), std::env::var(PASSWORD_VAR).ok()) {
        (Some(user), Some(password)) => Ok(Some((user, password))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(CommandError::usage(format!(
            "{USERNAME_VAR} is set but {PASSWORD_VAR} is not; set both, or neither for anonymous access"
        ))),
        (None, Some(_)) => Err(CommandError::usage(format!(
            "{PASSWORD_VAR} is set but {USERNAME_VAR} is not; set both, or neither for anonymous access"
        ))),
    }
}

fn parse_reference(text: &str) -> Result<oci_client::Reference, CommandError> {
    text.parse().map_err(|err| {
        CommandError::usage(format!(
            "{text:?} is not an OCI reference ({err}); expected REGISTRY/REPOSITORY:TAG, \
             e.g. 127.0.0.1:5000/agents/echo:1.0.0"
        ))
    })
}

pub async fn push(args: PushArgs) -> Result<Exit, CommandError> {
    let reference = parse_reference(&args.reference)?;
    let bytes = read_agent_file("FILE", &args.file)?;
    let digest = AgentDigest::of(&bytes);
    let (config, layer) = oci_wasm::WasmConfig::from_raw_component(bytes, None).map_err(|err| CommandError {
        exit: Exit::AgentInvalid,
        message: format!("{} is not a WebAssembly component: {err:#}", args.file.display()),
    })?;
    let client = registry_client(args.insecure);
    let auth = registry_auth(credentials()?.as_ref());
    let pushed = client
        .push(&reference, &auth, layer, config, None)
        .await
        .map_err(|err| CommandError::internal(format!("pushing to {}: {err:#}", args.reference)))?;
    println!("pushed {} to {}", args.file.display(), args.reference);
    println!("manifest {}", pushed.manifest_url);
    println!("agent.digest {digest}");
    Ok(Exit::Completed)
}

pub async fn pull(args: PullArgs) -> Result<Exit, CommandError> {
    let reference = parse_reference(&args.reference)?;
    let client = registry_client(args.insecure);
    let auth = registry_auth(credentials()?.as_ref());
    let image = client
        .pull(&reference, &auth)
        .await
        .map_err(|err| CommandError::internal(format!("pulling {}: {err:#}", args.reference)))?;
    // `WasmClient::pull` insists on exactly one `application/wasm` layer.
    let Some(layer) = image.layers.first() else {
        let message = format!("pulling {}: the artifact has no layer", args.reference);
        return Err(CommandError::internal(message));
    };
    let bytes = &layer.data;
    // A signed .cwasm is for a node's agent store, which verifies it with
    // its own keys; this command keeps only components.
    check_network_artifact(&args.reference, bytes, &TrustedKeys::default()).map_err(|refused| CommandError {
        exit: Exit::AgentInvalid,
        message: format!("{refused}; nothing was written to {}", args.output.display()),
    })?;
    std::fs::write(&args.output, bytes)
        .map_err(|err| CommandError::internal(format!("cannot write --output {}: {err}", args.output.display())))?;
    println!("pulled {} to {}", args.reference, args.output.display());
    println!("agent.digest {}", AgentDigest::of(bytes));
    Ok(Exit::Completed)
}
