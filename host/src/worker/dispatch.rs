//! From the queue to the sandbox: one run per free slot.
//!
//! A queued lease waits for a slot only until its deadline; after that it
//! is handed back (retryable), since the control plane will have re-leased
//! it anyway. When the node stops, queued leases are handed back at once
//! and running ones get the drain timeout to finish.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures_util::FutureExt as _;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::lease::{AcceptedLease, Report, Timings};
use super::report::Reporter;
use super::shutdown::Shutdown;
use super::specs::{SpecError, Specs};
use super::{NodeStats, Slots};
use crate::agent_store::{AgentDigest, AgentStore, DIGEST_METADATA_KEY, ResolveError};
use crate::sandbox::declarative::AgentSpec;
use crate::sandbox::{Agent, FailKind, RunContext, RunFailure, RunOutcome, RunReport, Sandbox};
use crate::telemetry::{self, FinishedRun, NodeMetrics};
use tracing::Span;
use tracing::field::{Empty, Field, Value};

/// The dispatch task's state: what running a lease needs.
pub(super) struct Dispatcher {
    pub(super) node_id: String,
    pub(super) sandbox: Arc<Sandbox>,
    pub(super) store: Arc<AgentStore>,
    /// The control plane's definitions, for agents no source has (`None`:
    /// declarative agents are off).
    pub(super) specs: Option<Arc<Specs>>,
    pub(super) slots: Slots,
    pub(super) stats: Arc<NodeStats>,
    pub(super) metrics: Arc<NodeMetrics>,
    pub(super) reporter: Arc<Reporter>,
    pub(super) shutdown: Shutdown,
}

impl Dispatcher {
    pub(super) async fn run(self: Arc<Self>, mut queue: mpsc::Receiver<AcceptedLease>, runs: TaskTracker) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.stopping() => break,
                accepted = queue.recv() => match accepted {
                    Some(accepted) => accepted,
                    None => break,
                },
            };
            // The contract's case: a lease already past its deadline fails,
            // retryable, without running (a re-lease comes with a new one).
            if accepted
                .deadline()
                .is_some_and(|deadline| deadline <= SystemTime::now())
            {
                let failure = RunFailure {
                    retryable: true,
                    ..RunFailure::new(
                        FailKind::BudgetDeadline,
                        "the lease's deadline had passed before the run could start",
                    )
                };
                self.reporter.hand_back(&accepted, failure).await;
                continue;
            }
            let deadline = accepted.deadline_instant();
            let permit = tokio::select! {
                // A free slot wins over a deadline that passes at the same moment.
                biased;
                _ = self.shutdown.stopping() => {
                    self.reporter.hand_back(&accepted, RunFailure::handed_back("the node is shutting down")).await;
                    break;
                }
                permit = self.slots.acquire() => permit.expect("the slots semaphore is never closed"),
                _ = sleep_until(deadline) => {
                    self.reporter.hand_back(&accepted, RunFailure::handed_back(
                        "the lease's deadline passed while it waited for a free slot",
                    )).await;
                    continue;
                }
            };
            runs.spawn(self.clone().execute(accepted, permit));
        }
        // Stopping: whatever is still queued goes back to the control plane.
        queue.close();
        while let Some(accepted) = queue.recv().await {
            self.reporter
                .hand_back(&accepted, RunFailure::handed_back("the node is shutting down"))
                .await;
        }
    }

    async fn execute(self: Arc<Self>, accepted: AcceptedLease, permit: OwnedSemaphorePermit) {
        let started = Instant::now();
        self.stats.run_started();
        let request = accepted.run_request();
        let context = &request.context;
        let span = lease_span(context, &self.node_id);
        // A run cut off in a host call is reported before its call is
        // unwound; the unwinding is done after the report is stored.
        let mut cut_off = None;
        let (outcome, run_report) = async {
            let pin = request.context.metadata.get(DIGEST_METADATA_KEY);
            let resolving = async {
                let resolved = match pin.map(|text| AgentDigest::parse(text)).transpose() {
                    Ok(pin) => {
                        self.store
                            .resolve_pinned(&self.sandbox, accepted.agent_id(), accepted.version(), pin)
                            .instrument(tracing::info_span!("resolve"))
                            .await
                    }
                    Err(invalid) => Err(invalid.into()),
                };
                match (resolved, &self.specs) {
                    // No source has it: the control plane's definition, if
                    // it has one. A pinned lease names bytes, which a
                    // definition is not.
                    (Err(not_found @ ResolveError::NotFound { .. }), Some(specs)) if pin.is_none() => {
                        match specs
                            .get(accepted.agent_id(), accepted.version())
                            .instrument(tracing::info_span!("definition"))
                            .await
                        {
                            Ok(spec) => Ok(Runnable::Spec(spec)),
                            // Both said no: what was looked for, and where.
                            Err(SpecError::NotDefined(asked)) => Err(Unrunnable::Spec(SpecError::Invalid(format!(
                                "{not_found}; nor does the control plane define it ({asked})"
                            )))),
                            Err(other) => Err(Unrunnable::Spec(other)),
                        }
                    }
                    (resolved, _) => resolved.map(Runnable::Component).map_err(Unrunnable::Resolve),
                }
            };
            // Fetching and compiling count against the lease's deadline and
            // obey shutdown: the run is abandoned, not started late (a
            // compilation already under way finishes on its own thread and
            // is kept for the next lease; its input is bounded).
            let resolved = tokio::select! {
                resolved = resolving => resolved,
                _ = sleep_until(accepted.deadline_instant()) => {
                    let failure = RunFailure {
                        retryable: true,
                        ..RunFailure::new(
                            FailKind::BudgetDeadline,
                            "the lease's deadline passed while its agent was being fetched or compiled",
                        )
                    };
                    return (RunOutcome::Failed(failure), RunReport::default());
                }
                _ = self.shutdown.runs_aborted() => {
                    let failure = RunFailure::handed_back(
                        "the node shut down while the run's agent was being fetched or compiled (drain timeout)",
                    );
                    return (RunOutcome::Failed(failure), RunReport::default());
                }
            };
            let runnable = match resolved {
                Ok(runnable) => runnable,
                // A download that failed is the node's trouble: hand it back.
                Err(Unrunnable::Resolve(err)) if err.is_retryable() => {
                    let failure = RunFailure::handed_back(err.to_string());
                    return (RunOutcome::Failed(failure), RunReport::default());
                }
                Err(Unrunnable::Resolve(err)) => {
                    let failure = RunFailure::new(FailKind::AgentInvalid, err.to_string());
                    return (RunOutcome::Failed(failure), RunReport::default());
                }
                Err(Unrunnable::Spec(SpecError::Unavailable(why))) => {
                    return (RunOutcome::Failed(RunFailure::handed_back(why)), RunReport::default());
                }
                Err(Unrunnable::Spec(SpecError::Invalid(why) | SpecError::NotDefined(why))) => {
                    let failure = RunFailure::new(FailKind::AgentInvalid, why);
                    return (RunOutcome::Failed(failure), RunReport::default());
                }
            };
            // A panic in the node's code (a bug, whatever input caused
            // it) is caught, so that it still ends the lease with a Fail
            // rather than with no report at all. (Caught here rather than
            // by running the run as a task of its own: a task costs every
            // lease a spawn, a wake-up and a copy of the run's future.)
            let running = std::panic::AssertUnwindSafe(async {
                match &runnable {
                    Runnable::Component(agent) => self.sandbox.run_reported(agent, request).await,
                    Runnable::Spec(spec) => self.sandbox.run_spec(spec, request).await.into(),
                }
            })
            .catch_unwind();
            tokio::select! {
                // Boxed: the run's future is large, and the lease's task
                // would otherwise be as large, copied whole when spawned.
                caught = Box::pin(running) => match caught {
                    Ok(reported) => {
                        cut_off = reported.cut_off;
                        (reported.result.outcome, reported.result.report)
                    }
                    Err(_) => {
                        tracing::error!("the run panicked: a bug in the node; the lease is handed back");
                        (
                            RunOutcome::Failed(RunFailure::handed_back(
                                "the node failed running this lease (it panicked: a bug in the node, logged on it)",
                            )),
                            RunReport::default(),
                        )
                    }
                },
                // Dropping the run's future ends the run.
                _ = self.shutdown.runs_aborted() => {
                    (
                        RunOutcome::Failed(RunFailure::handed_back(
                            "the node shut down before the run finished (drain timeout)",
                        )),
                        RunReport::default(),
                    )
                }
            }
        }
        .instrument(span.clone())
        .await;
        // The slot is given back once the report is stored and the call
        // unwound (below), not when the run ends; the run counts as active
        // until then, so that active and free slots add up to the slots.
        let fail_kind = match &outcome {
            RunOutcome::Completed(_) => None,
            RunOutcome::Failed(failure) => Some(failure.kind.as_str()),
        };
        record_run(&span, &run_report, fail_kind);
        match &outcome {
            RunOutcome::Completed(_) => span.in_scope(|| tracing::info!("run completed")),
            RunOutcome::Failed(failure) => {
                span.in_scope(|| tracing::info!(kind = %failure.kind, reason = %failure.message, "run failed"));
            }
        }
        let timings = Timings {
            received: accepted.received,
            started: Some(started),
            finished: Instant::now(),
        };
        self.metrics.run_finished(&FinishedRun {
            agent_id: accepted.agent_id(),
            fail_kind,
            executed: true,
            processing: timings.finished - timings.received,
            execution_ms: run_report.wall_ms,
            fuel_consumed: run_report.fuel_consumed,
            peak_memory_bytes: run_report.peak_memory_bytes,
            instantiate_us: run_report.instantiate_us,
            tokens: u64::from(run_report.tokens_in) + u64::from(run_report.tokens_out),
            usd_cost: run_report.usd_cost,
        });
        let report = Report::build(&accepted, &self.node_id, &outcome, &run_report, timings);
        self.reporter
            .deliver(report, accepted.lease.deadline_unix_ms, Some(&span))
            .instrument(span.clone())
            .await;
        // The run's instance keeps its slot in the pool until its call is
        // unwound: the slot is given back after that. A guest cut off while
        // computing says where it was.
        if let Some(call) = cut_off
            && let Some(backtrace) = call.unwind().await
        {
            span.in_scope(|| tracing::info!(%backtrace, "where the guest was when its deadline cut it off"));
        }
        self.stats.run_ended();
        drop(permit);
    }
}

/// The lease's span: every log line about the run carries its ids, and its
/// OpenTelemetry trace is the lease's (`trace_id`). What the run did is
/// recorded on it at the end ([`record_run`]).
fn lease_span(context: &RunContext, node_id: &str) -> Span {
    let span = tracing::info_span!(
        "lease",
        "lease.id" = %context.lease_id,
        "run.id" = %context.run_id,
        trace_id = %context.trace_id,
        "node.id" = %node_id,
        "agent.id" = %context.agent_id,
        "agent.version" = %context.agent_version,
        "outcome" = Empty,
        "outcome.kind" = Empty,
        "run.fuel_consumed" = Empty,
        "run.peak_memory_bytes" = Empty,
        "run.tokens_in" = Empty,
        "run.tokens_out" = Empty,
        "run.cost_usd" = Empty,
    );
    telemetry::adopt_trace_id(&span, &context.trace_id);
    span
}

/// The run's outcome and numbers on the lease's span, in one record: each
/// record is a call into every layer, which formats what it is given.
fn record_run(span: &Span, report: &RunReport, fail_kind: Option<&str>) {
    let Some(metadata) = span.metadata() else {
        return; // no layer wants the span
    };
    let fields = metadata.fields();
    let names = [
        "run.fuel_consumed",
        "run.peak_memory_bytes",
        "run.tokens_in",
        "run.tokens_out",
        "run.cost_usd",
        "outcome",
        "outcome.kind",
    ];
    let [
        Some(fuel),
        Some(memory),
        Some(tokens_in),
        Some(tokens_out),
        Some(cost),
        Some(outcome),
        Some(kind),
    ] = names.map(|name| fields.field(name))
    else {
        debug_assert!(false, "the lease span declares every run field");
        return;
    };
    let said = if fail_kind.is_some() { "failed" } else { "completed" };
    let values: [(&Field, Option<&dyn Value>); 7] = [
        (&fuel, Some(&report.fuel_consumed)),
        (&memory, Some(&report.peak_memory_bytes)),
        (&tokens_in, Some(&report.tokens_in)),
        (&tokens_out, Some(&report.tokens_out)),
        (&cost, Some(&report.usd_cost)),
        (&outcome, Some(&said)),
        (&kind, fail_kind.as_ref().map(|kind| kind as &dyn Value)),
    ];
    span.record_all(&fields.value_set(&values));
}

/// What a lease's agent turned out to be.
enum Runnable {
    /// A component from one of the node's sources.
    Component(Arc<Agent>),
    /// The control plane's definition, run by the built-in agent.
    Spec(Arc<AgentSpec>),
}

/// Why a lease's agent cannot run.
enum Unrunnable {
    Resolve(ResolveError),
    Spec(SpecError),
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// What a lease's line says once its run is recorded, as the human
    /// format writes it.
    fn line_after(report: &RunReport, fail_kind: Option<&str>) -> String {
        let written = Arc::new(Mutex::new(Vec::new()));
        let sink = written.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || SharedBuffer(sink.clone())),
        );
        tracing::subscriber::with_default(subscriber, || {
            let context = RunContext {
                lease_id: "lease-1".into(),
                run_id: "run-1".into(),
                agent_id: "echo".into(),
                agent_version: "1.0.0".into(),
                trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
                ..RunContext::default()
            };
            let span = lease_span(&context, "node-1");
            record_run(&span, report, fail_kind);
            span.in_scope(|| tracing::info!("run ended"));
        });
        String::from_utf8(written.lock().unwrap().clone()).unwrap()
    }

    struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_run_is_recorded_on_its_lease_span_in_one_go() {
        let report = RunReport {
            fuel_consumed: 12757,
            peak_memory_bytes: 1114720,
            tokens_in: 3,
            tokens_out: 4,
            usd_cost: 0.5,
            ..RunReport::default()
        };
        let completed = line_after(&report, None);
        assert!(
            completed.contains(
                "node.id=node-1 agent.id=echo agent.version=1.0.0 run.fuel_consumed=12757 \
                 run.peak_memory_bytes=1114720 run.tokens_in=3 run.tokens_out=4 run.cost_usd=0.5 \
                 outcome=\"completed\"}"
            ),
            "{completed}"
        );
        let failed = line_after(&report, Some("budget_fuel"));
        assert!(
            failed.contains("run.cost_usd=0.5 outcome=\"failed\" outcome.kind=\"budget_fuel\"}"),
            "{failed}"
        );
    }
}
