//! Declarative agents' definitions, as the worker gets them: from the
//! control plane's agent API when no agent source has the lease's agent,
//! kept per version (versions are immutable), one fetch per version at a
//! time.
//!
//! A 404 means the agent is not defined there either: `agent.invalid`,
//! as a missing component always was. Anything else (the plane
//! unreachable, a 5xx) is the node's trouble: the lease is handed back,
//! retryable, never run with something else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use support::sync::lock;

use crate::control_plane::{AgentApi, AgentApiError};
use crate::sandbox::declarative::AgentSpec;

/// Definitions kept in memory: past this many versions, or this many
/// bytes of definitions (each is at most `SPEC_BYTES`, 1 MiB), the older
/// half by last use is forgotten (and fetched again when a lease names
/// it).
const KEPT_VERSIONS: usize = 1024;
const KEPT_BYTES: usize = 64 << 20;

type SpecCell = Arc<tokio::sync::OnceCell<Arc<AgentSpec>>>;

/// Why a definition cannot be had.
#[derive(Debug)]
pub(super) enum SpecError {
    /// The plane has no such agent version either (its API answered 404):
    /// final. Says what was asked.
    NotDefined(String),
    /// Defined in a way that cannot run: final.
    Invalid(String),
    /// Could not be read now: hand the lease back.
    Unavailable(String),
}

pub(super) struct Specs {
    api: AgentApi,
    /// By (agent id, version): the definition's cell and when it was last
    /// asked for (a counter).
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    /// The cell, when it was last asked for (a counter), and the size of
    /// the definition it holds (0 until fetched).
    cells: HashMap<(String, String), (SpecCell, u64, usize)>,
    clock: u64,
    /// The sizes in `cells`, summed: kept as they change, so a lease does
    /// not walk every kept version.
    bytes: usize,
}

impl Specs {
    pub(super) fn new(api: AgentApi) -> Specs {
        Specs {
            api,
            kept: Mutex::default(),
        }
    }

    /// The definition of `agent_id` at `version`: kept, or fetched once
    /// for every run waiting on it. A failure keeps nothing.
    pub(super) async fn get(&self, agent_id: &str, version: &str) -> Result<Arc<AgentSpec>, SpecError> {
        let key = (agent_id.to_string(), version.to_string());
        let cell = {
            let mut kept = lock(&self.kept);
            kept.clock += 1;
            let now = kept.clock;
            let full = kept.cells.len() >= KEPT_VERSIONS || kept.bytes >= KEPT_BYTES;
            if full && !kept.cells.contains_key(&key) {
                // Forget the older half, by last use.
                let mut uses: Vec<u64> = kept.cells.values().map(|(_, used, _)| *used).collect();
                uses.sort_unstable();
                let cut = uses[uses.len() / 2];
                kept.cells.retain(|_, (_, used, _)| *used >= cut);
                kept.bytes = kept.cells.values().map(|(_, _, bytes)| bytes).sum();
            }
            let entry = kept.cells.entry(key.clone()).or_default();
            entry.1 = now;
            entry.0.clone()
        };
        let mut size = 0;
        let spec = cell
            .get_or_try_init(|| async {
                let bytes = self.api.version(agent_id, version).await.map_err(|err| match err {
                    AgentApiError::NotFound { url, .. } => SpecError::NotDefined(format!("{url} answered 404")),
                    AgentApiError::Unavailable { .. } => SpecError::Unavailable(err.to_string()),
                })?;
                size = bytes.len();
                let spec = AgentSpec::parse(&bytes).map_err(|invalid| {
                    SpecError::Invalid(format!(
                        "the control plane's definition of agent {agent_id} version {version} cannot \
                     run: {invalid}"
                    ))
                })?;
                Ok(Arc::new(spec))
            })
            .await
            .cloned();
        if size > 0 {
            let mut kept = lock(&self.kept);
            if let Some(entry) = kept.cells.get_mut(&key) {
                let before = std::mem::replace(&mut entry.2, size);
                kept.bytes = kept.bytes.saturating_sub(before) + size;
            }
        }
        spec
    }
}
