//! The log capability: `log.log`, the agent's structured log lines, passed
//! on through `tracing` inside the run's span (which carries the run id,
//! lease id, agent id and trace id), and capped per run.
//!
//! Its settings are the node's log caps (`NodeLimits`' `log_*` fields); its
//! per-run part is the run's [`RunLog`] (`run_log.rs`); it has no shared
//! part. The host function, its fuel prices and its linking are here. The
//! node's own warnings that a run causes are bounded per run by
//! [`HostWarnings`] (`host_warnings.rs`).

mod host_warnings;
mod run_log;

use wasmtime::component::{HasSelf, Linker};

use crate::sandbox::bindings;
use crate::sandbox::bindings::log::{Host, Level};
use crate::sandbox::state::RunState;

pub use host_warnings::{HOST_WARNINGS_PER_KIND, HostWarning, HostWarnings};
pub use run_log::{RunLog, truncate};

/// Fuel a run pays for each log field it hands the host (two strings
/// copied out of the guest and looked at), on top of the call's own.
const FUEL_PER_FIELD: u64 = 200;
/// And for each byte of its message and fields.
pub(crate) const FUEL_PER_BYTE: u64 = 4;

/// Offers `log.log`, in both versions of the agent world.
pub(crate) fn add_to_linker(linker: &mut Linker<RunState>) -> wasmtime::Result<()> {
    bindings::log::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    bindings::v2::log::add_to_linker::<_, HasSelf<_>>(linker, |state| state)
}

/// The agent world 0.2.0's `log.log`: the same line, the same caps.
impl bindings::v2::log::Host for RunState {
    fn log(
        &mut self,
        level: bindings::v2::log::Level,
        message: String,
        fields: Vec<(String, String)>,
    ) -> wasmtime::Result<()> {
        use bindings::v2::log::Level as V2;
        let level = match level {
            V2::Trace => Level::Trace,
            V2::Debug => Level::Debug,
            V2::Info => Level::Info,
            V2::Warn => Level::Warn,
            V2::Error => Level::Error,
        };
        <RunState as Host>::log(self, level, message, fields)
    }
}

impl Host for RunState {
    fn log(&mut self, level: Level, message: String, fields: Vec<(String, String)>) -> wasmtime::Result<()> {
        // The message and each field were copied out of the guest and are
        // looked at here: host work a flood of fields or a loop of large
        // messages would otherwise get for free.
        let bytes = message.len() + fields.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        self.host_work_fuel += fields.len() as u64 * FUEL_PER_FIELD + bytes as u64 * FUEL_PER_BYTE;
        let Some((message, fields)) = self.log.line(&message, &fields) else {
            return Ok(());
        };
        match level {
            Level::Trace => tracing::trace!(target: "agent", %fields, "{message}"),
            Level::Debug => tracing::debug!(target: "agent", %fields, "{message}"),
            Level::Info => tracing::info!(target: "agent", %fields, "{message}"),
            Level::Warn => tracing::warn!(target: "agent", %fields, "{message}"),
            Level::Error => tracing::error!(target: "agent", %fields, "{message}"),
        }
        Ok(())
    }
}
