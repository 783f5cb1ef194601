//! What remains of the run's budgets: fuel, memory, time and tokens.

pub use crate::bindings::node_runtime::agent::budget::RemainingBudget as Remaining;

/// Each value counts down from the run's limit.
pub fn remaining() -> Remaining {
    crate::bindings::node_runtime::agent::budget::remaining()
}
