//! `NodeRuntime`: who the node is and how it talks to the control plane.

use std::collections::BTreeMap;

use crate::config::error::ConfigError;
use crate::config::reader::{Reader, Section};
use crate::config::{Capacity, NodeRuntimeSection};

pub(in crate::config) fn bind(reader: &mut Reader<'_>, root: &mut Section) -> Result<NodeRuntimeSection, ConfigError> {
    let defaults = NodeRuntimeSection::default();
    let mut s = reader.section(root, "NodeRuntime")?;
    let node_id = reader.required_text(&mut s, "NodeId", &defaults.node_id, "a non-empty node id, e.g. node-1")?;
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
    reader.finish(s);
    Ok(NodeRuntimeSection {
        admin_listen,
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

fn capacity(reader: &mut Reader<'_>, parent: &mut Section) -> Result<Capacity, ConfigError> {
    let defaults = Capacity::default();
    let mut s = reader.section(parent, "Capacity")?;
    let capacity = Capacity {
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
    let names: Vec<String> = s.entries.0.iter().map(|(name, _)| name.clone()).collect();
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
