//! Agent definitions loaded at start-up (`node-runtime dev --definitions
//! DIR`): each `*.json` file in the directory is an agent in the
//! reference's format, published as one version, so a plane can serve the
//! reference's own definition files without anyone calling the agent API.
//!
//! A file's `agentId` is kept if it has one (else the file's stem), its
//! version is a top-level `"version"` (else `1.0.0`); it is validated as
//! `POST /v1/agents/{agentId}:version` validates a spec. A version the
//! plane already holds (a reused data dir) must be the same spec: versions
//! are immutable, so a file that changed is an error naming it, as is any
//! file that fails; either stops the plane from starting.

use std::path::{Path, PathBuf};

use super::agents::{self, Agent, AgentBook, AgentChange, AgentVersion};

/// One definition file, read and checked.
#[derive(Debug, Clone)]
pub struct Definition {
    pub path: PathBuf,
    pub agent: Agent,
    pub version: String,
}

/// Why the definitions cannot be loaded; names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("cannot read the definitions directory {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent definition {}: {problem}; fix the file or move it out of the definitions directory", path.display())]
    File { path: PathBuf, problem: String },
}

/// Every `*.json` file of `dir`, by file name, read and validated.
pub fn read_dir(dir: &Path) -> Result<Vec<Definition>, DefinitionError> {
    let dir_failed = |source| DefinitionError::Dir {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(dir_failed)? {
        let path = entry.map_err(dir_failed)?.path();
        if path.extension().is_some_and(|ext| ext == "json") && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    paths.into_iter().map(|path| read_file(&path)).collect()
}

fn read_file(path: &Path) -> Result<Definition, DefinitionError> {
    let bad = |problem: String| DefinitionError::File {
        path: path.to_path_buf(),
        problem,
    };
    let bytes = std::fs::read(path).map_err(|err| bad(format!("cannot read it: {err}")))?;
    if bytes.len() > agents::MAX_AGENT_BODY_BYTES {
        return Err(bad(format!(
            "it is {} bytes, more than the {} an agent may be",
            bytes.len(),
            agents::MAX_AGENT_BODY_BYTES
        )));
    }
    let object = agents::parse_object(&bytes).map_err(|err| bad(err.replace("the request body", "the file")))?;
    let (agent_id, version) = agents::file_ids(&object).map_err(bad)?;
    let agent_id = match agent_id {
        Some(agent_id) => agent_id,
        None => path
            .file_stem()
            .and_then(|stem| stem.to_str())
            .unwrap_or_default()
            .to_string(),
    };
    if let Some(problem) = agents::agent_id_problem(&agent_id) {
        return Err(bad(problem));
    }
    let version = version.unwrap_or_else(|| agents::DEFAULT_FILE_VERSION.to_string());
    if let Some(problem) = agents::version_problem(&version) {
        return Err(bad(problem));
    }
    let mut agent = Agent::from_json(&object).map_err(bad)?;
    agent.agent_id = agent_id;
    let errors = agents::validate_spec(&agent);
    if !errors.is_empty() {
        return Err(bad(format!("Spec validation failed: {}", errors.join("; "))));
    }
    Ok(Definition {
        path: path.to_path_buf(),
        agent,
        version,
    })
}

/// What publishing `definition` changes in `book`: the agent if it is
/// new, the version if it is new; nothing when the same version with the
/// same spec is there already; an error when that version's spec differs.
pub fn changes(
    book: &AgentBook,
    definition: &Definition,
    created_at: &str,
) -> Result<Vec<AgentChange>, DefinitionError> {
    let agent_id = &definition.agent.agent_id;
    if let Some(existing) = book.version(agent_id, &definition.version) {
        if existing.spec == definition.agent {
            return Ok(Vec::new());
        }
        return Err(DefinitionError::File {
            path: definition.path.clone(),
            problem: format!(
                "the plane already holds version {} of agent {agent_id} with another spec, and versions are \
                 immutable: give the file a new \"version\" (or start the plane with another data dir)",
                definition.version
            ),
        });
    }
    let mut changes = Vec::new();
    if book.agent(agent_id).is_none() {
        changes.push(AgentChange::PutAgent(definition.agent.clone()));
    }
    changes.push(AgentChange::PutVersion(AgentVersion {
        agent_id: agent_id.clone(),
        version: definition.version.clone(),
        spec: definition.agent.clone(),
        created_at: created_at.to_string(),
    }));
    Ok(changes)
}
