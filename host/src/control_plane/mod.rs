//! The control-plane client: registration and heartbeat over REST, agent
//! versions (declarative agents' definitions) over REST, leases and
//! reports over gRPC.
//!
//! These types only speak the wire protocol; the rules of when to call
//! what live in the worker. `tls` builds the one TLS configuration both
//! clients use.

pub mod agents;
pub mod calls;
pub mod leases;
pub mod registration;
pub mod report;
pub mod tls;

pub use agents::{AgentApi, AgentApiError};
pub use leases::{LeaseClient, LeaseClientError, LeaseStream, is_message_too_large};
pub use registration::{Capacity, HeartbeatAnswer, NodeState, NodeStatus, Registration, RestClient, RestError};
pub use report::Report;
pub use tls::{ControlPlaneTls, TlsError, TlsOptions};
