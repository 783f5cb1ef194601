//! From a lease to a run request, and from a run's end to the report the
//! control plane receives.
//!
//! Everything in a lease comes from the network: budgets of 0 mean "the
//! node's default", a deadline of 0 means "none", and a trace id may be a
//! hyphenated GUID (the reference) or 32 hex digits (W3C).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message as _;

pub use crate::control_plane::Report;
use crate::sandbox::outcome::cut;
use crate::sandbox::{BudgetRequest, FailKind, RunContext, RunFailure, RunOutcome, RunReport, RunRequest};
use proto::{CompleteRequest, CostInfo, FailRequest, Lease, SandboxReport, TimingInfo};

/// The largest report the node sends, encoded: under 4 MiB, the smallest
/// message limit a control plane is known to have (gRPC's default, which
/// the reference's ASP.NET server keeps), with room for the framing.
pub const MAX_REPORT_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;

/// What a shrunk Fail keeps of its message.
const SHRUNK_MESSAGE_BYTES: usize = 1024;

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
            let left = deadline.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
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
    let valid = hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()) && hex.chars().any(|c| c != '0');
    if valid {
        hex.to_ascii_lowercase()
    } else {
        if !raw.is_empty() {
            tracing::warn!(
                trace_id = raw,
                "the lease's trace id is not a GUID or 32 hex digits; using a new one"
            );
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

/// How a run becomes the [`Report`] the control plane is owed (the type
/// itself is the control-plane client's: it is what that client sends).
impl Report {
    /// The report of `outcome`. It always fits in [`MAX_REPORT_BYTES`]: a
    /// failure's message and details are capped by the sandbox, and a
    /// result map too large to send (a node configured with a larger
    /// `MaxResultBytes` than a control plane takes) becomes a
    /// `budget.output` Fail.
    pub fn build(
        accepted: &AcceptedLease,
        node_id: &str,
        outcome: &RunOutcome,
        report: &RunReport,
        timings: Timings,
    ) -> Report {
        let built = Self::build_unchecked(accepted, node_id, outcome, report, timings);
        if built.encoded_len() <= MAX_REPORT_BYTES {
            return built;
        }
        let shrunk = built.shrunk();
        if shrunk.encoded_len() <= MAX_REPORT_BYTES {
            return shrunk;
        }
        // Only the ids are left to be large, and the lease's own ids came
        // in a message of the plane's; cut them rather than send nothing.
        let mut last = shrunk;
        if let Report::Fail(request) = &mut last {
            request.lease_id = cut(std::mem::take(&mut request.lease_id), 64 * 1024);
            request.run_id = cut(std::mem::take(&mut request.run_id), 64 * 1024);
        }
        last
    }

    fn build_unchecked(
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
                result: wire_result(&lease.lease_id, result),
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
                error_message: failure.one_line_message(),
                error_details: error_details(failure, report),
                timings: Some(timings.wire(report)),
                retryable: failure.retryable,
                sandbox: Some(sandbox_report(report)),
            }),
        }
    }

    /// The same outcome in as few bytes as keep it meaningful, for a
    /// control plane that refused the report for its size: a Fail keeps
    /// the start of its message and its kind, and drops its details; a
    /// Complete, whose result cannot be cut without changing it, becomes a
    /// `budget.output` Fail that says why.
    pub fn shrunk(&self) -> Report {
        match self {
            Report::Complete(request) => {
                let size = request.encoded_len();
                let failure = RunFailure::new(
                    FailKind::BudgetOutput,
                    format!(
                        "the run completed, but its report ({size} bytes with a result of {} \
                         entries) is larger than the control plane accepts; lower \
                         Sandbox.MaxResultBytes so that agents learn it at run time",
                        request.result.len()
                    ),
                );
                Report::Fail(FailRequest {
                    lease_id: request.lease_id.clone(),
                    run_id: request.run_id.clone(),
                    node_id: request.node_id.clone(),
                    error_message: failure.message.clone(),
                    error_details: serde_json::json!({
                        "kind": failure.kind,
                        "message": failure.message,
                        "retryable": false,
                        "details": "",
                    })
                    .to_string(),
                    timings: request.timings,
                    retryable: false,
                    sandbox: request.sandbox,
                })
            }
            Report::Fail(request) => {
                let kind = serde_json::from_str::<serde_json::Value>(&request.error_details)
                    .ok()
                    .and_then(|details| details.get("kind").cloned())
                    .unwrap_or(serde_json::Value::Null);
                let message = cut(request.error_message.clone(), SHRUNK_MESSAGE_BYTES);
                Report::Fail(FailRequest {
                    error_details: serde_json::json!({
                        "kind": kind,
                        "message": message,
                        "retryable": request.retryable,
                        "details": "[cut: the report was larger than the control plane accepts]",
                    })
                    .to_string(),
                    error_message: message,
                    ..request.clone()
                })
            }
        }
    }
}

/// The result map as sent: each NUL replaced by U+FFFD, which a database
/// behind a control plane (PostgreSQL's `text`) would otherwise refuse,
/// and with it the whole report.
fn wire_result(lease_id: &str, result: &crate::sandbox::ResultMap) -> HashMap<String, String> {
    let mut replaced = false;
    let mut clean = |text: &String| {
        if text.contains('\0') {
            replaced = true;
            text.replace('\0', "\u{fffd}")
        } else {
            text.clone()
        }
    };
    let wire = result.iter().map(|(key, value)| (clean(key), clean(value))).collect();
    if replaced {
        tracing::warn!(%lease_id, "the result holds NUL characters, sent as U+FFFD: control planes backed by PostgreSQL refuse NUL; encode binary data (base64) in results");
    }
    wire
}

fn sandbox_report(report: &RunReport) -> SandboxReport {
    SandboxReport {
        fuel_consumed: report.fuel_consumed,
        peak_memory_bytes: report.peak_memory_bytes,
        instantiate_us: report.instantiate_us,
        peak_host_bytes: report.peak_host_bytes,
        http_denied: report.http_denied,
        host_warnings_suppressed: report.host_warnings_suppressed,
    }
}

/// `FailRequest.error_details`: machine-readable JSON.
fn error_details(failure: &RunFailure, report: &RunReport) -> String {
    serde_json::json!({
        "kind": failure.kind,
        "message": failure.one_line_message(),
        "retryable": failure.retryable,
        "details": support::redact::urls_in(&failure.details),
        "report": report,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{BudgetConstraints, RunSpec};

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

    fn accepted(lease_id: &str) -> AcceptedLease {
        AcceptedLease {
            lease: Lease {
                lease_id: lease_id.into(),
                run_id: "run-1".into(),
                ..Lease::default()
            },
            received: Instant::now(),
        }
    }

    fn timings() -> Timings {
        Timings {
            received: Instant::now(),
            started: None,
            finished: Instant::now(),
        }
    }

    #[test]
    fn a_result_is_sent_without_nul() {
        let result = crate::sandbox::ResultMap::from([("k\0".to_string(), "a\0b".to_string())]);
        let report = Report::build(
            &accepted("lease-1"),
            "node-1",
            &RunOutcome::Completed(result),
            &RunReport::default(),
            timings(),
        );
        let Report::Complete(complete) = report else {
            panic!("completed")
        };
        assert_eq!(complete.result.get("k\u{fffd}").map(String::as_str), Some("a\u{fffd}b"));
    }

    #[test]
    fn every_report_fits_in_a_message_a_control_plane_takes() {
        // A result map far over what a plane takes (a node configured with
        // a large MaxResultBytes) becomes a budget.output Fail.
        let result: crate::sandbox::ResultMap = (0..300).map(|n| (format!("k{n}"), "v".repeat(20_000))).collect();
        let report = Report::build(
            &accepted("lease-1"),
            "node-1",
            &RunOutcome::Completed(result),
            &RunReport::default(),
            timings(),
        );
        assert!(report.encoded_len() <= MAX_REPORT_BYTES, "{}", report.encoded_len());
        let Report::Fail(fail) = &report else {
            panic!("a Complete of 6 MB was sent")
        };
        assert!(
            fail.error_message.contains("larger than the control plane accepts"),
            "{}",
            fail.error_message
        );
        assert!(fail.error_details.contains("budget.output"), "{}", fail.error_details);
        assert!(!fail.retryable);
        // A failure built around the caps (message and details full of
        // characters JSON escapes six-fold) still fits.
        let failure = RunFailure::new(FailKind::AgentError, "\u{1}".repeat(20 << 20))
            .with_details("\u{1}".repeat(20 << 20))
            .capped();
        let report = Report::build(
            &accepted("lease-2"),
            "node-1",
            &RunOutcome::Failed(failure),
            &RunReport::default(),
            timings(),
        );
        assert!(report.encoded_len() <= MAX_REPORT_BYTES, "{}", report.encoded_len());
        // Uncapped (as an older node's outbox may hold it) it is shrunk.
        let failure = RunFailure::new(FailKind::AgentError, "m".repeat(20 << 20)).with_details("d".repeat(20 << 20));
        let report = Report::build(
            &accepted("lease-3"),
            "node-1",
            &RunOutcome::Failed(failure),
            &RunReport::default(),
            timings(),
        );
        assert!(report.encoded_len() < 16 * 1024, "{}", report.encoded_len());
        let Report::Fail(fail) = &report else { panic!() };
        assert!(
            fail.error_details.contains("agent.error") && fail.error_message.ends_with("bytes cut]"),
            "{}",
            fail.error_details
        );
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
