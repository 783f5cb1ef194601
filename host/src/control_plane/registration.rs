//! Registration and heartbeat over the control plane's REST API.
//!
//! The JSON is the reference's: camelCase, metadata keys kept as given.
//! The contract's rules live in the caller (the worker's heartbeat loop);
//! this file only speaks HTTP and says what the answer meant.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    pub slots: u32,
    pub cpu: String,
    pub memory: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    pub node_id: String,
    pub metadata: BTreeMap<String, String>,
    pub capacity: Capacity,
}

/// What the node tells the scheduler in every heartbeat.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub state: NodeState,
    pub active_runs: u32,
    pub available_slots: u32,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Takes leases.
    Active,
    /// Shutting down: takes no new leases, finishes what it has.
    Draining,
}

#[derive(Debug, Error)]
pub enum RestError {
    #[error("the control plane at {url} could not be reached: {}", super::tls::describe(source))]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the control plane answered {status} to {url}: {body}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
        body: String,
    },
}

impl RestError {
    /// A 5xx: the server failed, which for a re-registration may just mean
    /// "already registered" (the reference's Postgres store answers 500).
    pub fn is_server_error(&self) -> bool {
        matches!(self, RestError::Status { status, .. } if status.is_server_error())
    }
}

/// What a heartbeat's answer means for the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatAnswer {
    Accepted,
    /// 404: the control plane does not know this node (it restarted without
    /// persistence): register again.
    UnknownNode,
}

#[derive(Debug, Clone)]
pub struct RestClient {
    base: String,
    http: reqwest::Client,
}

impl RestClient {
    /// `base` is `ControlPlaneUrl` without a trailing slash.
    pub fn new(base: &str, http: reqwest::Client) -> Self {
        RestClient {
            base: base.trim_end_matches('/').to_string(),
            http,
        }
    }

    pub async fn register(&self, registration: &Registration) -> Result<(), RestError> {
        let url = format!("{}/v1/nodes:register", self.base);
        let response = self.post(&url, registration).await?;
        if response.status().is_success() {
            return Ok(());
        }
        Err(status_error(url, response).await)
    }

    pub async fn heartbeat(&self, node_id: &str, status: NodeStatus) -> Result<HeartbeatAnswer, RestError> {
        let url = format!("{}/v1/nodes/{node_id}:heartbeat", self.base);
        let response = self.post(&url, &serde_json::json!({ "status": status })).await?;
        match response.status() {
            status if status.is_success() => Ok(HeartbeatAnswer::Accepted),
            reqwest::StatusCode::NOT_FOUND => Ok(HeartbeatAnswer::UnknownNode),
            _ => Err(status_error(url, response).await),
        }
    }
}

impl RestClient {
    async fn post(&self, url: &str, body: &impl Serialize) -> Result<reqwest::Response, RestError> {
        self.http
            .post(url)
            .json(body)
            .send()
            .await
            .map_err(|source| RestError::Unreachable {
                url: url.to_string(),
                source,
            })
    }
}

async fn status_error(url: String, response: reqwest::Response) -> RestError {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    RestError::Status {
        url,
        status,
        body: body.chars().take(300).collect(),
    }
}

/// The HTTP client for the REST calls: bounded in time so a hung control
/// plane cannot stall a heartbeat past its interval. An `https://` URL is
/// verified against the system roots.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    http_client_with(timeout, &super::ControlPlaneTls::plaintext())
}

/// Like [`http_client`], with the control plane's TLS (the same
/// configuration as the gRPC channel's, offering HTTP/1.1).
pub fn http_client_with(timeout: Duration, tls: &super::ControlPlaneTls) -> Result<reqwest::Client, reqwest::Error> {
    let builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("node-runtime/", env!("CARGO_PKG_VERSION")));
    match tls.client_config(&[b"http/1.1"]) {
        Some(config) => builder.tls_backend_preconfigured(config).build(),
        None => builder.build(),
    }
}
