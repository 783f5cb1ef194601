//! The message the control plane is owed for each lease it handed out.

use prost::Message as _;

use proto::{CompleteRequest, FailRequest};

/// What the node sends for one lease: exactly one of these. The worker
/// builds it from a run (`worker::lease`); the outbox keeps it until the
/// plane has it.
#[derive(Debug, Clone)]
pub enum Report {
    Complete(CompleteRequest),
    Fail(FailRequest),
}

impl Report {
    pub fn lease_id(&self) -> &str {
        match self {
            Report::Complete(request) => &request.lease_id,
            Report::Fail(request) => &request.lease_id,
        }
    }

    /// The size of the report on the wire (without gRPC's framing).
    pub fn encoded_len(&self) -> usize {
        match self {
            Report::Complete(request) => request.encoded_len(),
            Report::Fail(request) => request.encoded_len(),
        }
    }
}
