//! The HTTP capability's per-run part: one run's egress policy.
//!
//! [`EgressPolicy`] is built per run from the node's grants for the agent
//! id, narrowed by the run's metadata `http.allow`. It decides which hosts
//! (and ports) the run may reach, counts the run's requests, sent and
//! denied, for its report, keeps the count of its requests in flight (each
//! holds an `InFlight` place until its connection ends), bounds the
//! warnings its requests make the node log (`HostWarnings`), and carries
//! the run's trace context into its requests. The request itself is sent by its
//! `WasiHttpHooks` impl, in `outgoing.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use http::header::HeaderValue;
use tokio_util::sync::CancellationToken;

use super::grant::{HTTP_ALLOW_METADATA_KEY, HostGrant};
use crate::sandbox::capabilities::log::{HostWarning, HostWarnings};
use crate::sandbox::host_memory::HostLimits;

/// The events' target from before this file moved, so that log filters
/// written for it (`Logging.LogLevel`) still apply.
const LOG_TARGET: &str = "node_runtime::sandbox::capabilities::http";

/// One run's egress: what it may reach, and what its requests carry.
#[derive(Debug)]
pub struct EgressPolicy {
    allowed: Vec<HostGrant>,
    pub(super) run_id: String,
    trace_id: String,
    /// When the host gives up on a request: a little after the run's
    /// deadline (`state_builder::HOST_WAITS_GRACE`).
    pub(super) deadline: Instant,
    pub(super) limits: HostLimits,
    /// Requests sent and not yet finished (their connection task holds a
    /// count until it ends).
    pub(super) in_flight: Arc<AtomicU32>,
    /// Requests sent and requests denied, for the run's report.
    pub(crate) requests: u32,
    pub(crate) denied: u32,
    /// The run's denials and failures as the node logs them: the first few
    /// of each kind, the rest counted.
    pub(crate) warnings: HostWarnings,
    /// Cancelled when the run is cut off at its deadline: its requests and
    /// their connections end there, before the run is reported, rather
    /// than when its suspended call is unwound.
    pub(crate) cut_off: CancellationToken,
}

/// One request in flight; dropping it frees the place.
pub(super) struct InFlight(pub(super) Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl EgressPolicy {
    /// The node's grants for the agent, narrowed by the run's metadata
    /// `http.allow` when present: only what both allow (metadata can never
    /// add a host; an empty `http.allow` allows nothing). Unparseable
    /// metadata entries allow nothing and are logged.
    pub fn new(
        node_grants: &[HostGrant],
        metadata_allow: Option<&str>,
        run_id: &str,
        trace_id: &str,
        deadline: Instant,
        limits: HostLimits,
    ) -> EgressPolicy {
        let warnings = HostWarnings::default();
        let allowed = match metadata_allow {
            None => node_grants.to_vec(),
            Some(list) => {
                let mut narrowed: Vec<HostGrant> = Vec::new();
                for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                    let wanted = match HostGrant::parse(entry) {
                        Ok(wanted) => wanted,
                        Err(err) => {
                            if warnings.admit(HostWarning::MetadataIgnored) {
                                tracing::warn!(target: LOG_TARGET, "metadata {HTTP_ALLOW_METADATA_KEY}: {err}; ignored");
                            }
                            continue;
                        }
                    };
                    for grant in node_grants {
                        if let Some(both) = grant.intersect(&wanted)
                            && !narrowed.contains(&both)
                        {
                            narrowed.push(both);
                        }
                    }
                }
                narrowed
            }
        };
        EgressPolicy {
            allowed,
            run_id: run_id.to_string(),
            trace_id: trace_id.to_string(),
            deadline,
            limits,
            in_flight: Arc::default(),
            requests: 0,
            denied: 0,
            warnings,
            cut_off: CancellationToken::new(),
        }
    }

    /// The effective allow-list.
    #[cfg(test)]
    pub fn allowed(&self) -> &[HostGrant] {
        &self.allowed
    }

    /// Whether `host` on `port` may be reached.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        self.allowed.iter().any(|grant| grant.allows(host, port))
    }

    /// `00-{trace id}-{span id}-01`: the span id is the request span's
    /// when traces are exported, else a fresh one.
    pub(crate) fn traceparent(&self, span_id: Option<u64>) -> Option<HeaderValue> {
        let trace_id = self.trace_id.to_ascii_lowercase();
        let valid = trace_id.len() == 32
            && trace_id.bytes().all(|b| b.is_ascii_hexdigit())
            && trace_id.bytes().any(|b| b != b'0');
        if !valid {
            return None;
        }
        let span_id = span_id.filter(|id| *id != 0).unwrap_or_else(|| {
            loop {
                let id: u64 = rand::random();
                if id != 0 {
                    break id;
                }
            }
        });
        HeaderValue::from_str(&format!("00-{trace_id}-{span_id:016x}-01")).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(entries: &[&str]) -> Vec<HostGrant> {
        entries.iter().map(|e| HostGrant::parse(e).unwrap()).collect()
    }

    fn policy(node: &[&str], metadata: Option<&str>) -> EgressPolicy {
        EgressPolicy::new(
            &grants(node),
            metadata,
            "run-1",
            "4bf92f3577b34da6a3ce929d0e0e4736",
            Instant::now(),
            HostLimits::default(),
        )
    }

    #[test]
    fn a_host_grant_allows_any_port_and_a_port_grant_only_its_port() {
        let policy = policy(&["Example.com", "127.0.0.1:8080"], None);
        assert!(policy.allows("example.COM", 443));
        assert!(policy.allows("example.com", 8443));
        assert!(policy.allows("127.0.0.1", 8080));
        assert!(!policy.allows("127.0.0.1", 8081));
        assert!(!policy.allows("other.com", 443));
        assert!(!policy.allows("sub.example.com", 443));
    }

    #[test]
    fn metadata_narrows_and_never_widens() {
        let node = ["a.com", "b.com:8080", "c.com"];
        let narrowed = policy(&node, Some("a.com:443, b.com, evil.com"));
        assert_eq!(narrowed.allowed(), grants(&["a.com:443", "b.com:8080"]).as_slice());
        assert!(!narrowed.allows("a.com", 80));
        assert!(!narrowed.allows("c.com", 443));
        assert!(!narrowed.allows("evil.com", 443));
        assert!(policy(&node, Some("b.com:9090")).allowed().is_empty());
        assert!(policy(&node, Some("")).allowed().is_empty());
        assert!(policy(&[], Some("a.com")).allowed().is_empty());
    }

    #[test]
    fn traceparent_carries_the_trace_id_and_a_fresh_span_id() {
        let policy = policy(&[], None);
        let a = policy.traceparent(None).unwrap();
        let b = policy.traceparent(None).unwrap();
        let a = a.to_str().unwrap();
        assert!(
            a.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && a.ends_with("-01"),
            "{a}"
        );
        assert_eq!(a.len(), 55);
        assert_ne!(a, b.to_str().unwrap());
    }
}
