//! The effective configuration, printed back in the reference's shape.
//!
//! `node-runtime config check` shows what the node would run with: every
//! section and key under the reference's names, defaults filled in, the
//! environment applied, paths resolved. Secrets print as `"***"` when set
//! (the API key, and a password inside a URL); certificate and key paths
//! are not secrets. The output is itself a valid configuration.
//!
//! The shape is spelt out in structs rather than built as a
//! `serde_json::Value`, whose maps would sort the sections alphabetically.
//! Each section's view lives with the section (`sections`); this file
//! puts them in the reference's order and holds what they share.

use std::path::Path;

use serde::Serialize;

use super::NodeConfig;
use super::sections::{
    agent_runtime, agent_store, declarative_agents, logging, mtls, node_runtime, open_telemetry, sandbox,
};

pub(super) const REDACTED: &str = "***";

pub(super) fn redacted_json(config: &NodeConfig) -> String {
    let view = View::of(config);
    let json = serde_json::to_string_pretty(&view).expect("the configuration view serialises");
    // Any URL among the values (a template, an endpoint): no credentials.
    support::redact::urls_in(&json).into_owned()
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct View<'a> {
    node_runtime: node_runtime::View<'a>,
    #[serde(rename = "MTls")]
    mtls: mtls::View,
    agent_runtime: agent_runtime::View<'a>,
    open_telemetry: open_telemetry::View<'a>,
    logging: logging::View<'a>,
    sandbox: sandbox::View<'a>,
    agent_store: agent_store::View<'a>,
    declarative_agents: declarative_agents::View<'a>,
}

impl<'a> View<'a> {
    fn of(config: &'a NodeConfig) -> Self {
        View {
            node_runtime: node_runtime::View::of(&config.node_runtime),
            mtls: mtls::View::of(&config.mtls),
            agent_runtime: agent_runtime::View::of(&config.agent_runtime),
            open_telemetry: open_telemetry::View::of(&config.open_telemetry),
            logging: logging::View::of(&config.logging),
            sandbox: sandbox::View::of(&config.sandbox),
            agent_store: agent_store::View::of(&config.agent_store),
            declarative_agents: declarative_agents::View::of(&config.declarative_agents),
        }
    }
}

pub(super) fn path(path: &Path) -> String {
    path.display().to_string()
}

/// `https://user:password@host/` prints as `https://***@host/`, and
/// secret-named query parameters lose their values (`support::redact`).
pub(super) fn redact_url(uri: &http::Uri) -> String {
    support::redact::url(&uri.to_string())
}
