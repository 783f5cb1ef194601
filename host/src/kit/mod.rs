//! The agent kit: everything an agent developer needs to go from nothing
//! to a built component, shipped inside the binary. `new` writes a project
//! from the embedded templates, SDKs and agent world ([`project`]);
//! `build` turns a project into a component with its language's toolchain,
//! installed pinned on first use ([`toolchain`], [`build`]); `run-agent
//! --watch` rebuilds on save ([`watch`]).
//!
//! The kit runs programs (cargo, componentize-py, componentize-js) and
//! writes files; it imports nothing of the node. Checking that a built
//! component is an agent of a world this node serves is the sandbox's
//! job, done by the commands that use both.

pub mod build;
mod embedded;
pub mod project;
pub mod toolchain;
pub mod watch;

pub use build::{Built, build};
pub use project::{Language, Project, WORLD, create};

/// Why a kit command could not do its work; each names the thing and the fix.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// The command line (a name, a directory) is at fault.
    #[error("{0}")]
    Usage(String),
    /// A tool the build needs is missing or failed to install.
    #[error("{0}")]
    Tool(String),
    /// The project's own build failed (a compile error in the agent).
    #[error("{0}")]
    Build(String),
    /// A file could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl KitError {
    pub(crate) fn io<'a>(
        what: &'static str,
        path: &'a std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> KitError + 'a {
        move |source| KitError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}
