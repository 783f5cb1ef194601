//! The run's context, as maps instead of the wire's lists of pairs.

use std::collections::BTreeMap;

/// A result map: it becomes the lease's `Complete` result. A `BTreeMap`,
/// not a `HashMap`: its fixed order keeps fuel use the same run to run.
pub type Output = BTreeMap<String, String>;

/// What the node knows about this run, taken from the lease.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub run_id: String,
    pub lease_id: String,
    pub agent_id: String,
    pub agent_version: String,
    /// 32 lowercase hex digits (W3C trace context).
    pub trace_id: String,
    /// The run's input; the message is under `message`.
    pub input_ref: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
}

impl Context {
    /// The run's message (`input_ref["message"]`; `run-agent --input`
    /// and the dev plane put the submitted input there).
    pub fn input(&self) -> Option<&str> {
        self.get("message")
    }

    /// One `input_ref` entry.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.input_ref.get(key).map(String::as_str)
    }

    /// One `metadata` entry.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }
}

impl From<crate::bindings::RunContext> for Context {
    fn from(context: crate::bindings::RunContext) -> Self {
        // A repeated key keeps its last value, as the world says.
        Context {
            run_id: context.run_id,
            lease_id: context.lease_id,
            agent_id: context.agent_id,
            agent_version: context.agent_version,
            trace_id: context.trace_id,
            input_ref: context.input_ref.into_iter().collect(),
            metadata: context.metadata.into_iter().collect(),
        }
    }
}
