//! The control-plane client: registration and heartbeat over REST, leases
//! and reports over gRPC, and the backoff every network loop uses.
//!
//! These types only speak the wire protocol; the rules of when to call
//! what live in the worker. `tls` builds the one TLS configuration both
//! clients use.

pub mod backoff;
pub mod leases;
pub mod registration;
pub mod tls;

pub use backoff::Backoff;
pub use leases::{LeaseClient, LeaseClientError, LeaseStream};
pub use registration::{Capacity, HeartbeatAnswer, NodeState, NodeStatus, Registration, RestClient, RestError};
pub use tls::{ControlPlaneTls, TlsError, TlsOptions};

/// rustls needs one process-wide crypto provider; the node uses ring (the
/// provider wasmtime's HTTP client already brings). Safe to call often.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Fails only if another provider was installed first, which is as
        // good for us.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
