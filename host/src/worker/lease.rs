//! From a lease to a run request, and from a run's end to the report the
//! control plane receives.
//!
//! Everything in a lease comes from the network: budgets of 0 mean "the
//! node's default", a deadline of 0 means "none", and a trace id may be a
//! hyphenated GUID (the reference) or 32 hex digits (W3C).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::proto::{CompleteRequest, CostInfo, FailRequest, Lease, SandboxReport, TimingInfo};
use crate::sandbox::{BudgetRequest, RunContext, RunFailure, RunOutcome, RunReport, RunRequest};

/// A lease the node accepted, with the moment it arrived.
#[derive(Debug, Clone)]
pub struct AcceptedLease {
    pub lease: Lease,
    pub received: Instant,
}

impl AcceptedLease {
    pub fn agent_id(&self) -> &str {
        self.lease.run_spec.as_ref().map_or("", |spec| &spec.agent_id)
    }

    pub fn version(&self) -> &str {
        self.lease.run_spec.as_ref().map_or("", |spec| &spec.version)
    }

    /// The lease's deadline, if it has one.
    pub fn deadline(&self) -> Option<SystemTime> {
        u64::try_from(self.lease.deadline_unix_ms)
            .ok()
            .filter(|ms| *ms > 0)
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// The same deadline on the monotonic clock, for timers.
    pub fn deadline_instant(&self) -> Option<Instant> {
        self.deadline().map(|deadline| {
            let left = deadline
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            Instant::now() + left
        })
    }

    pub fn run_request(&self) -> RunRequest {
        let spec = self.lease.run_spec.clone().unwrap_or_default();
        let budgets = spec.budgets.unwrap_or_default();
        let positive_u64 = |value: i64| u64::try_from(value).ok().filter(|v| *v > 0);
        let budget = BudgetRequest {
            fuel: positive_u64(budgets.max_fuel),
            memory_bytes: positive_u64(budgets.max_memory_bytes),
            duration: positive_u64(budgets.max_duration_seconds.into()).map(Duration::from_secs),
            tokens: u32::try_from(budgets.max_tokens).ok().filter(|t| *t > 0),
        };
        RunRequest {
            context: RunContext {
                run_id: self.lease.run_id.clone(),
                lease_id: self.lease.lease_id.clone(),
                agent_id: spec.agent_id,
                agent_version: spec.version,
                trace_id: trace_id(&self.lease.trace_id),
                input_ref: sorted(spec.input_ref),
                metadata: sorted(spec.metadata),
            },
            budget,
            deadline: self.deadline(),
        }
    }
}

fn sorted(map: HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

/// The run's trace id: the lease's, as 32 lowercase hex digits. A GUID
/// without its hyphens is a valid 128-bit trace id. Anything else (empty,
/// malformed, all zeros) gets a fresh id, so logs still correlate.
pub fn trace_id(raw: &str) -> String {
    let hex: String = raw.chars().filter(|c| *c != '-').collect();
    let valid = hex.len() == 32
        && hex.chars().all(|c| c.is_ascii_hexdigit())
        && hex.chars().any(|c| c != '0');
    if valid {
        hex.to_ascii_lowercase()
    } else {
        if !raw.is_empty() {
            tracing::warn!(trace_id = raw, "the lease's trace id is not a GUID or 32 hex digits; using a new one");
        }
        uuid::Uuid::new_v4().simple().to_string()
    }
}

/// When a run's phases began and ended, for `TimingInfo`.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub received: Instant,
    /// When the run got a slot (None: it never started).
    pub started: Option<Instant>,
    pub finished: Instant,
}

impl Timings {
    fn wire(&self, report: &RunReport) -> TimingInfo {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let started = self.started.unwrap_or(self.finished);
        TimingInfo {
            duration_ms: ms(self.finished - self.received),
            queue_time_ms: ms(started - self.received),
            execution_time_ms: i64::try_from(report.wall_ms).unwrap_or(i64::MAX),
        }
    }
}

/// What the node sends for one lease: exactly one of these.
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

    pub fn build(
        accepted: &AcceptedLease,
        node_id: &str,
        outcome: &RunOutcome,
        report: &RunReport,
        timings: Timings,
    ) -> Report {
        let lease = &accepted.lease;
        match outcome {
            RunOutcome::Completed(result) => Report::Complete(CompleteRequest {
                lease_id: lease.lease_id.clone(),
                run_id: lease.run_id.clone(),
                node_id: node_id.to_string(),
                result: result.clone().into_iter().collect(),
                timings: Some(timings.wire(report)),
                costs: Some(CostInfo {
                    tokens_in: i32::try_from(report.tokens_in).unwrap_or(i32::MAX),
                    tokens_out: i32::try_from(report.tokens_out).unwrap_or(i32::MAX),
                    usd_cost: report.usd_cost,
                }),
                sandbox: Some(sandbox_report(report)),
            }),
            RunOutcome::Failed(failure) => Report::Fail(FailRequest {
                lease_id: lease.lease_id.clone(),
                run_id: lease.run_id.clone(),
                node_id: node_id.to_string(),
                error_message: failure.message.clone(),
                error_details: error_details(failure, report),
                timings: Some(timings.wire(report)),
                retryable: failure.retryable,
                sandbox: Some(sandbox_report(report)),
            }),
        }
    }
}

fn sandbox_report(report: &RunReport) -> SandboxReport {
    SandboxReport {
        fuel_consumed: report.fuel_consumed,
        peak_memory_bytes: report.peak_memory_bytes,
        instantiate_us: report.instantiate_us,
    }
}

/// `FailRequest.error_details`: machine-readable JSON.
fn error_details(failure: &RunFailure, report: &RunReport) -> String {
    serde_json::json!({
        "kind": failure.kind,
        "message": failure.message,
        "retryable": failure.retryable,
        "details": failure.details,
        "report": report,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{BudgetConstraints, RunSpec};

    #[test]
    fn a_guid_trace_id_becomes_32_hex_digits() {
        assert_eq!(
            trace_id("4BF92F35-77B3-4DA6-A3CE-929D0E0E4736"),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            trace_id("4bf92f3577b34da6a3ce929d0e0e4736"),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let fresh = trace_id("not-a-trace-id");
        assert_eq!(fresh.len(), 32);
        assert_ne!(trace_id("00000000-0000-0000-0000-000000000000"), "0".repeat(32));
    }

    #[test]
    fn zero_budgets_and_deadline_mean_node_defaults() {
        let accepted = AcceptedLease {
            lease: Lease {
                lease_id: "lease-1".into(),
                run_id: "run-1".into(),
                run_spec: Some(RunSpec {
                    agent_id: "echo".into(),
                    version: "1.0.0".into(),
                    budgets: Some(BudgetConstraints {
                        max_tokens: 0,
                        max_duration_seconds: 5,
                        max_fuel: -1,
                        max_memory_bytes: 1024,
                    }),
                    ..RunSpec::default()
                }),
                deadline_unix_ms: 0,
                trace_id: String::new(),
            },
            received: Instant::now(),
        };
        let request = accepted.run_request();
        assert_eq!(request.budget.tokens, None);
        assert_eq!(request.budget.fuel, None, "negative is no budget");
        assert_eq!(request.budget.duration, Some(Duration::from_secs(5)));
        assert_eq!(request.budget.memory_bytes, Some(1024));
        assert_eq!(request.deadline, None);
        assert_eq!(request.context.agent_id, "echo");
    }
}
