//! `NodeRuntime`: who the node is and how it talks to the control plane.
//! Its type and defaults, its binding, and its printed view, so that each
//! of its keys is spelt here only.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::config::effective::{path, redact_url};
use crate::config::error::ConfigError;
use crate::config::reader::{Reader, Section};
use crate::config::tree::Origin;

/// `NodeRuntime`: who the node is and how it talks to the control plane.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRuntimeSection {
    /// `NodeId`: the id the node registers under; never empty.
    pub node_id: String,
    /// `ControlPlaneUrl`: absolute `http://` or `https://` with a host.
    pub control_plane_url: http::Uri,
    /// `MaxConcurrentLeases`: sent as `max_leases` in each `Pull`.
    pub max_concurrent_leases: u32,
    /// `HeartbeatIntervalSeconds`: whole seconds, at least 1.
    pub heartbeat_interval: Duration,
    /// `Capacity`: what registration reports.
    pub capacity: CapacitySection,
    /// `Metadata`: sent at registration with its keys exactly as written
    /// (the reference sends `Region`, `Environment`).
    pub metadata: BTreeMap<String, String>,
    /// `AgentsDirectory` (this node): agents as
    /// `<dir>/<agent_id>/<version>.wasm` or `.cwasm`.
    pub agents_directory: PathBuf,
    /// `DataDirectory` (this node): the node's state, such as its outbox.
    pub data_directory: PathBuf,
    /// `DrainTimeoutSeconds` (this node): how long shutdown waits for
    /// running leases; 0 does not wait.
    pub drain_timeout: Duration,
    /// `AdminListen` (this node): where `/healthz`, `/readyz` and
    /// `/metrics` are served, e.g. `127.0.0.1:9090`; None (the default)
    /// serves nothing.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// `MaxLeaseMessageBytes` (this node): the largest lease the node
    /// decodes from the lease stream. A lease carries its run's input
    /// inline, and gRPC's default of 4 MiB broke the stream on a 5 MiB
    /// input; the default, 64 MiB, bounds what one message may cost in
    /// memory (one stream, one message at a time) while taking any input
    /// a plane is likely to send inline.
    pub max_lease_message_bytes: u64,
    /// `CallsStream` (this node): whether Ack, Complete and Fail share one
    /// stream (`Calls`) where the control plane has it, or are each a
    /// request of their own. On by default; off for a proxy that mishandles
    /// a long-lived bidirectional stream.
    pub calls_stream: bool,
}

/// `NodeRuntime.Capacity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacitySection {
    /// `Slots`: runs the node takes at once (with `MaxConcurrentLeases`,
    /// see [`NodeConfig::slots`](crate::config::NodeConfig::slots)).
    pub slots: u32,
    /// `Cpu`: reported as written, e.g. "4".
    pub cpu: String,
    /// `Memory`: reported as written, e.g. "8Gi".
    pub memory: String,
}

impl Default for NodeRuntimeSection {
    fn default() -> Self {
        NodeRuntimeSection {
            node_id: "node-1".to_string(),
            control_plane_url: http::Uri::from_static("http://localhost:5109"),
            max_concurrent_leases: 5,
            heartbeat_interval: Duration::from_secs(30),
            capacity: CapacitySection::default(),
            metadata: BTreeMap::new(),
            agents_directory: PathBuf::from("agents"),
            data_directory: PathBuf::from("data"),
            drain_timeout: Duration::from_secs(30),
            admin_listen: None,
            max_lease_message_bytes: 64 << 20,
            calls_stream: true,
        }
    }
}

impl Default for CapacitySection {
    fn default() -> Self {
        CapacitySection {
            slots: 8,
            cpu: "4".to_string(),
            memory: "8Gi".to_string(),
        }
    }
}

/// What `NodeId` may be: it is a segment of the control plane's URLs
/// (`/v1/nodes/{id}/heartbeat`), so a `/` once made every heartbeat 404.
const NODE_ID_EXPECTED: &str = "a non-empty node id of letters, digits, `-`, `_`, `.` and `~` (it is part of the \
     control plane's URLs), at most 128 characters, e.g. node-1";

/// URL-safe as it is (RFC 3986's unreserved characters), not `.` or `..`.
fn valid_node_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

pub(in crate::config) fn bind(reader: &mut Reader<'_>, root: &mut Section) -> Result<NodeRuntimeSection, ConfigError> {
    let defaults = NodeRuntimeSection::default();
    let mut s = reader.section(root, "NodeRuntime")?;
    let node_id = match reader.setting(&mut s, "NodeId", NODE_ID_EXPECTED)? {
        None => defaults.node_id.clone(),
        Some(setting) => match setting.scalar.text() {
            Some(text) if valid_node_id(&text) => text,
            _ => return Err(reader.rejected(setting, NODE_ID_EXPECTED)),
        },
    };
    let control_plane_url = reader
        .url(&mut s, "ControlPlaneUrl", "https://control-plane:5109", false)?
        .flatten()
        .unwrap_or(defaults.control_plane_url);
    let max_concurrent_leases = reader.integer(
        &mut s,
        "MaxConcurrentLeases",
        defaults.max_concurrent_leases,
        1..=i32::MAX as i128,
        "a whole number of at least 1 (leases asked for per pull), e.g. 5",
    )?;
    let heartbeat_interval = reader.seconds(
        &mut s,
        "HeartbeatIntervalSeconds",
        defaults.heartbeat_interval,
        1..=i32::MAX as i128,
        "a whole number of seconds greater than 0, e.g. 30",
    )?;
    let capacity = capacity(reader, &mut s)?;
    let metadata = metadata(reader, &mut s)?;
    let agents_directory = reader.required_path(&mut s, "AgentsDirectory", "agents")?;
    let data_directory = reader.required_path(&mut s, "DataDirectory", "data")?;
    // Downloads are kept under DataDirectory/agents/<source>/<id>/...; an
    // agents directory inside that would read them as the operator's own
    // files (a .cwasm from the network run without its signature). The
    // same directory is fine: there, the cache's folders are one level
    // deeper than any agent's files (the shipped manifests use it so).
    let downloads = data_directory.join("agents");
    if agents_directory.starts_with(&downloads) && agents_directory != downloads {
        return Err(reader.invalid(
            s.key("AgentsDirectory"),
            format!("{:?}", agents_directory.display().to_string()),
            &Origin::Unset,
            format!(
                "it lies in the download cache ({}), whose files must never count as the operator's \
                 own; use a directory outside DataDirectory/agents",
                downloads.display()
            ),
        ));
    }
    let drain_timeout = reader.seconds(
        &mut s,
        "DrainTimeoutSeconds",
        defaults.drain_timeout,
        0..=i32::MAX as i128,
        "a whole number of seconds, 0 or more, e.g. 30",
    )?;
    let admin_listen = match reader.setting(&mut s, "AdminListen", "a string")? {
        None => None,
        Some(setting) => match setting.scalar.text().filter(|text| !text.trim().is_empty()) {
            None => None,
            Some(text) => match text.trim().parse::<std::net::SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    return Err(reader.invalid(
                        setting.key,
                        setting.scalar.to_string(),
                        &setting.origin,
                        "an IP address and port for the admin endpoint, e.g. 127.0.0.1:9090 \
                         (0.0.0.0:9090 in a pod), or empty for none"
                            .to_string(),
                    ));
                }
            },
        },
    };
    let max_lease_message_bytes = reader.size(
        &mut s,
        "MaxLeaseMessageBytes",
        defaults.max_lease_message_bytes,
        64 << 10,
        "a size in bytes of at least 64KiB: a number, or with a unit such as 64MiB",
    )?;
    let calls_stream = reader.boolean(&mut s, "CallsStream", defaults.calls_stream)?;
    reader.finish(s);
    Ok(NodeRuntimeSection {
        calls_stream,
        admin_listen,
        max_lease_message_bytes,
        node_id,
        control_plane_url,
        max_concurrent_leases,
        heartbeat_interval,
        capacity,
        metadata,
        agents_directory,
        data_directory,
        drain_timeout,
    })
}

fn capacity(reader: &mut Reader<'_>, parent: &mut Section) -> Result<CapacitySection, ConfigError> {
    let defaults = CapacitySection::default();
    let mut s = reader.section(parent, "Capacity")?;
    let capacity = CapacitySection {
        slots: reader.integer(
            &mut s,
            "Slots",
            defaults.slots,
            1..=i32::MAX as i128,
            "a whole number of at least 1 (runs the node takes at once), e.g. 8",
        )?,
        cpu: reader.text(&mut s, "Cpu", &defaults.cpu)?,
        memory: reader.text(&mut s, "Memory", &defaults.memory)?,
    };
    reader.finish(s);
    Ok(capacity)
}

/// Every key is the node's to report: none is unknown, and each keeps
/// its spelling.
fn metadata(reader: &mut Reader<'_>, parent: &mut Section) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut s = reader.section(parent, "Metadata")?;
    let names: Vec<String> = s.entries.names();
    let mut metadata = BTreeMap::new();
    for name in names {
        if let Some(setting) = reader.setting(&mut s, &name, "a string")?
            && let Some(text) = setting.scalar.text()
        {
            metadata.insert(name, text);
        }
    }
    Ok(metadata)
}

/// `NodeRuntime` as `config check` prints it.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::config) struct View<'a> {
    node_id: &'a str,
    control_plane_url: String,
    max_concurrent_leases: u32,
    heartbeat_interval_seconds: u64,
    capacity: CapacityView<'a>,
    metadata: &'a BTreeMap<String, String>,
    agents_directory: String,
    data_directory: String,
    drain_timeout_seconds: u64,
    admin_listen: Option<String>,
    max_lease_message_bytes: u64,
    calls_stream: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CapacityView<'a> {
    slots: u32,
    cpu: &'a str,
    memory: &'a str,
}

impl<'a> View<'a> {
    pub(in crate::config) fn of(node: &'a NodeRuntimeSection) -> Self {
        View {
            node_id: &node.node_id,
            control_plane_url: redact_url(&node.control_plane_url),
            max_concurrent_leases: node.max_concurrent_leases,
            heartbeat_interval_seconds: node.heartbeat_interval.as_secs(),
            capacity: CapacityView {
                slots: node.capacity.slots,
                cpu: &node.capacity.cpu,
                memory: &node.capacity.memory,
            },
            metadata: &node.metadata,
            agents_directory: path(&node.agents_directory),
            data_directory: path(&node.data_directory),
            drain_timeout_seconds: node.drain_timeout.as_secs(),
            admin_listen: node.admin_listen.map(|addr| addr.to_string()),
            max_lease_message_bytes: node.max_lease_message_bytes,
            calls_stream: node.calls_stream,
        }
    }
}
