//! `node-runtime build [DIR]`: a kit project into a component, checked as
//! the node will check it, with the `agent.digest` pin a lease can carry.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;

use super::{CommandError, Exit, kit_error};
use crate::agent_store::AgentDigest;
use crate::app::{self, NodeConfig};
use crate::sandbox::Sandbox;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The project's folder (the one with agent.toml); default: the current
    /// directory.
    #[arg(value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
}

pub async fn run(args: BuildArgs) -> Result<Exit, CommandError> {
    let dir = args.dir.clone();
    let built = tokio::task::spawn_blocking(move || crate::kit::build(&dir))
        .await
        .map_err(|err| CommandError::internal(format!("the build stopped: {err}")))?
        .map_err(kit_error)?;
    let sandbox = checking_sandbox()?;
    let (bytes, kind) = check(&sandbox, &built.component).await?;
    println!("built {}", built.component.display());
    println!("  size          {}", support::units::format_bytes(bytes.len() as u64));
    // What the component is, as the node loaded it; the project's world
    // (checked to be one the node serves) for an agent of the agent world.
    if kind == "command" {
        println!("  world         a WASI command (wasi:cli/run)");
    } else {
        println!("  world         {} (agent.toml)", built.project.world);
    }
    println!("  agent.digest  {}", AgentDigest::of(&bytes));
    Ok(Exit::Completed)
}

/// A sandbox with the node's defaults, to check components with.
pub(crate) fn checking_sandbox() -> Result<Sandbox, CommandError> {
    let mut node = NodeConfig::default();
    node.node_runtime.max_concurrent_leases = 1;
    node.sandbox.compiled_cache_max_bytes = 0;
    Sandbox::new(app::sandbox_config(&node)).map_err(|err| CommandError::internal(err.to_string()))
}

/// Loads the component as a node would: an agent of a world this node
/// serves, or an `agent.invalid` error saying why not.
pub(crate) async fn check(sandbox: &Sandbox, component: &Path) -> Result<(Vec<u8>, &'static str), CommandError> {
    let bytes = super::read_agent_file("the built component", &component.to_path_buf())?;
    match sandbox.load(Arc::from(bytes.clone())).await {
        Ok(agent) => Ok((bytes, agent.kind())),
        Err(invalid) => Err(CommandError {
            exit: Exit::AgentInvalid,
            message: format!("{}: {invalid}", component.display()),
        }),
    }
}
