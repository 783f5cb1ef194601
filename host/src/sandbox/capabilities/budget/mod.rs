//! The budget capability: `budget.remaining`, what is left of each meter.
//!
//! It has no settings, shared part or per-run state of its own: it reads
//! the run's meters, whose limits are the run's `Budget` (`sandbox/budget.rs`,
//! the node's ceilings every meter shares) and whose readings live in the
//! `Store` (fuel) and the run state (memory, tokens, the deadline).
//!
//! Linked by hand rather than through the generated trait because reading
//! the fuel needs the `Store`, not only the host state.

use std::time::Instant;

use wasmtime::StoreContextMut;
use wasmtime::component::Linker;

use crate::sandbox::bindings::budget::RemainingBudget;
use crate::sandbox::bindings::v2::budget::RemainingBudget as V2RemainingBudget;
use crate::sandbox::state::RunState;

const INTERFACE: &str = "node-runtime:agent/budget@0.1.0";
/// The same interface in the agent world 0.2.0.
const INTERFACE_V2: &str = "node-runtime:agent/budget@0.2.0";

pub(crate) fn add_to_linker(linker: &mut Linker<RunState>) -> wasmtime::Result<()> {
    linker
        .instance(INTERFACE)?
        .func_wrap("remaining", |store: StoreContextMut<'_, RunState>, (): ()| {
            Ok((remaining(&store)?,))
        })?;
    linker
        .instance(INTERFACE_V2)?
        .func_wrap("remaining", |store: StoreContextMut<'_, RunState>, (): ()| {
            let RemainingBudget {
                fuel,
                memory_bytes,
                time_ms,
                tokens,
            } = remaining(&store)?;
            Ok((V2RemainingBudget {
                fuel,
                memory_bytes,
                time_ms,
                tokens,
            },))
        })?;
    Ok(())
}

/// What remains of each meter.
fn remaining(store: &StoreContextMut<'_, RunState>) -> wasmtime::Result<RemainingBudget> {
    let state = store.data();
    // Less what the run owes for host work it caused.
    let fuel = store.get_fuel()?.saturating_sub(state.host_work_fuel);
    let time_ms = state.deadline.saturating_duration_since(Instant::now()).as_millis();
    Ok(RemainingBudget {
        fuel,
        memory_bytes: state.memory.remaining_bytes(),
        time_ms: u64::try_from(time_ms).unwrap_or(u64::MAX),
        tokens: state.tokens.remaining(),
    })
}
