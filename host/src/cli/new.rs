//! `node-runtime new <rust|python|js> NAME`: a new agent project, written
//! from the templates this binary carries (no network).

use std::path::PathBuf;

use clap::Args;

use super::{CommandError, Exit, kit_error};
use crate::kit::{self, Language};

#[derive(Debug, Args)]
pub struct NewArgs {
    /// The agent's language.
    #[arg(value_enum)]
    pub language: Language,

    /// The agent's name: lowercase letters, digits, `-` and `_`, starting
    /// with a letter. It names the crate or module, the component and the
    /// agent.
    pub name: String,

    /// The project's folder, created (or existing and empty); default:
    /// ./NAME.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

pub async fn run(args: NewArgs) -> Result<Exit, CommandError> {
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from(&args.name));
    let project = kit::create(args.language, &args.name, &dir).map_err(kit_error)?;
    println!(
        "created the {} agent `{}` in {} (world {})",
        project.language.as_str(),
        project.name,
        dir.display(),
        project.world
    );
    println!();
    println!("  cd {}", dir.display());
    println!("  node-runtime build");
    println!(
        "  node-runtime run-agent --input-file input.json target/{}.wasm",
        project.name
    );
    println!("  node-runtime run-agent --input-file input.json --watch .   # rebuild and rerun on save");
    Ok(Exit::Completed)
}
