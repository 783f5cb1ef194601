//! The sections of the configuration, one file each, named for the
//! section as the reference spells it: each holds its settings' type, its
//! defaults, how it is bound from the merged tree (through `reader`) and
//! how `config check` prints it back (see `effective`).

pub(super) mod agent_runtime;
pub(super) mod agent_store;
pub(super) mod declarative_agents;
pub(super) mod logging;
pub(super) mod mtls;
pub(super) mod node_runtime;
pub(super) mod open_telemetry;
pub(super) mod sandbox;
