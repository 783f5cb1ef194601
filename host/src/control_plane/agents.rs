//! The control plane's agent API, as a node reads it: one agent version's
//! definition (`GET /v1/agents/{agentId}/versions/{version}`), for a lease
//! whose agent no source has. The answer is handed on as bytes; reading
//! it is the sandbox's (`sandbox::declarative`).

use thiserror::Error;

/// The largest answer read: a definition is a few KiB.
pub const AGENT_VERSION_BYTES: usize = 1024 * 1024;

#[derive(Debug, Error)]
pub enum AgentApiError {
    /// 404: the plane has no such agent or version.
    #[error("the control plane has no agent {agent_id} version {version} ({url} answered 404)")]
    NotFound {
        agent_id: String,
        version: String,
        url: String,
    },
    /// Anything else: unreachable, a 5xx, an answer too large or cut off.
    /// Another attempt, here or on another node, may succeed.
    #[error("could not read agent {agent_id} version {version} from the control plane: {why}")]
    Unavailable {
        agent_id: String,
        version: String,
        why: String,
    },
}

/// Reads agent versions over the node's REST client (the same TLS and
/// client certificate as registration).
#[derive(Debug, Clone)]
pub struct AgentApi {
    base: String,
    http: reqwest::Client,
}

impl AgentApi {
    /// `base` is `ControlPlaneUrl`.
    pub fn new(base: &str, http: reqwest::Client) -> Self {
        AgentApi {
            base: base.trim_end_matches('/').to_string(),
            http,
        }
    }

    /// The version document's bytes. The ids are checked by the caller
    /// (no separators, no `..`) and percent-encoded here.
    pub async fn version(&self, agent_id: &str, version: &str) -> Result<Vec<u8>, AgentApiError> {
        let url = format!(
            "{}/v1/agents/{}/versions/{}",
            self.base,
            support::percent::component(agent_id),
            support::percent::component(version)
        );
        let unavailable = |why: String| AgentApiError::Unavailable {
            agent_id: agent_id.to_string(),
            version: version.to_string(),
            why,
        };
        let mut response = self
            .http
            .get(&url)
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|err| unavailable(format!("{url}: {}", super::tls::describe(&err))))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(AgentApiError::NotFound {
                agent_id: agent_id.to_string(),
                version: version.to_string(),
                url,
            });
        }
        if !status.is_success() {
            return Err(unavailable(format!("{url} answered {status}")));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| unavailable(format!("{url}: the answer was cut off ({err})")))?
        {
            if body.len() + chunk.len() > AGENT_VERSION_BYTES {
                return Err(unavailable(format!(
                    "{url}: the answer is more than the {AGENT_VERSION_BYTES} bytes a definition may take"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}
