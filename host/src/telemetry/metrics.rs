//! The node's metrics: one OpenTelemetry meter (`Node.Runtime`), read two
//! ways from the same instruments: by the OTLP exporter every
//! `ExportIntervalMilliseconds`, and on demand by the admin endpoint's
//! `/metrics` (Prometheus text, rendered in `prometheus`).
//!
//! Counts the worker keeps anyway (`NodeStats`, the slots semaphore, the
//! outbox) are not counted twice: they are *observed* through a
//! [`NodeObserver`] the worker registers, each time metrics are collected.
//! What only exists at the end of a run (durations, fuel, memory, tokens,
//! cost, failure kinds) is recorded here by [`NodeMetrics::run_finished`].
//!
//! Metric attributes are bounded: agent id, outcome, failure kind. Never a
//! lease or run id (those belong to spans and logs).

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use support::sync::lock;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality};

/// The meter's (and tracer's) name, as the reference node names them.
pub const METER_NAME: &str = "Node.Runtime";

/// Every metric name the node exports, for the docs, the dashboard test
/// and anyone grepping.
pub const METRIC_NAMES: &[&str] = &[
    "leases_received_total",
    "leases_acknowledged_total",
    "leases_without_id_total",
    "leases_interrupted_total",
    "lease_messages_too_large_total",
    "outbox_writable",
    "outbox_write_failures_total",
    "leases_completed_total",
    "leases_failed_total",
    "agent_executions_total",
    "agent_execution_errors_total",
    "lease_stream_errors_total",
    "lease_stream_reconnects_total",
    "lease_processing_duration_ms",
    "agent_execution_duration_ms",
    "agent_tokens_total",
    "agent_cost_usd",
    "active_leases",
    "available_slots",
    "agent_fuel_consumed",
    "agent_peak_memory_bytes",
    "agent_instantiate_duration_us",
    "agent_compile_cache_hits_total",
    "agent_compile_cache_misses_total",
    "heartbeat_failures_total",
    "reports_delivered_total",
    "outbox_depth",
    "outbox_oldest_age_seconds",
    "outbox_reports_dropped_total",
];

/// The worker's running counts, read at each collection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCounts {
    pub leases_received: u64,
    pub leases_acknowledged: u64,
    /// Leases refused because their lease id was empty.
    pub leases_without_id: u64,
    /// Leases found in flight at start-up and failed as interrupted.
    pub leases_interrupted: u64,
    /// Lease messages larger than `MaxLeaseMessageBytes`.
    pub lease_messages_too_large: u64,
    /// Outbox writes the disk refused.
    pub outbox_write_failures: u64,
    /// 1 while the outbox records, 0 while it cannot.
    pub outbox_writable: u64,
    pub runs_started: u64,
    pub lease_stream_errors: u64,
    pub lease_stream_reconnects: u64,
    pub heartbeat_failures: u64,
    pub reports_delivered: u64,
    /// Expired plus overflowed.
    pub reports_dropped: u64,
    pub compile_cache_hits: u64,
    pub compile_cache_misses: u64,
    pub active_leases: u64,
    pub available_slots: u64,
}

/// What the outbox holds, read at each collection.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OutboxBacklog {
    pub depth: u64,
    /// Age of the oldest report, 0 when empty.
    pub oldest_age: Duration,
}

/// Implemented by the worker: the counts it keeps anyway.
pub trait NodeObserver: Send + Sync {
    fn counts(&self) -> NodeCounts;
    /// None when the outbox cannot be read.
    fn outbox_backlog(&self) -> Option<OutboxBacklog>;
}

/// How a run ended, as the metrics record it.
#[derive(Debug, Clone, Default)]
pub struct FinishedRun<'a> {
    pub agent_id: &'a str,
    /// None: completed; Some(kind): failed with that `FailKind` string.
    pub fail_kind: Option<&'static str>,
    /// False for a lease handed back before it ran.
    pub executed: bool,
    /// Lease received -> outcome.
    pub processing: Duration,
    /// Inside the sandbox.
    pub execution_ms: u64,
    pub fuel_consumed: u64,
    pub peak_memory_bytes: u64,
    pub instantiate_us: u64,
    pub tokens: u64,
    pub usd_cost: f64,
}

/// The instruments, and the reader behind `/metrics`.
pub struct NodeMetrics {
    provider: SdkMeterProvider,
    reader: Arc<ManualReader>,
    observer: Arc<Mutex<Option<Weak<dyn NodeObserver>>>>,
    leases_completed: Counter<u64>,
    leases_failed: Counter<u64>,
    execution_errors: Counter<u64>,
    processing_ms: Histogram<f64>,
    execution_ms: Histogram<f64>,
    tokens: Histogram<u64>,
    cost: Histogram<f64>,
    fuel: Histogram<u64>,
    peak_memory: Histogram<u64>,
    instantiate_us: Histogram<u64>,
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeMetrics")
    }
}

impl Default for NodeMetrics {
    /// Metrics read only by `/metrics` (no exporter): what a node started
    /// without telemetry, e.g. in tests, gets.
    fn default() -> Self {
        NodeMetrics::new(Resource::builder_empty().build(), None)
    }
}

/// Lets the provider own a reader that `/metrics` keeps a handle on.
#[derive(Debug)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

const DURATION_MS: &[f64] = &[
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
];
const TOKENS: &[f64] = &[0.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0];
const COST_USD: &[f64] = &[0.0001, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];
const FUEL: &[f64] = &[1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11];
const MEMORY_BYTES: &[f64] = &[
    1048576.0,
    4194304.0,
    16777216.0,
    33554432.0,
    67108864.0,
    134217728.0,
    268435456.0,
    536870912.0,
    1073741824.0,
];
const INSTANTIATE_US: &[f64] = &[10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0, 10000.0, 50000.0];

impl NodeMetrics {
    /// The instruments on a provider with `resource`, read by `/metrics`
    /// and, when given, by `exporter` (the OTLP periodic reader).
    pub(crate) fn new(
        resource: Resource,
        exporter: Option<opentelemetry_sdk::metrics::PeriodicReader<opentelemetry_otlp::MetricExporter>>,
    ) -> NodeMetrics {
        let reader = Arc::new(ManualReader::builder().build());
        let mut builder = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(SharedReader(reader.clone()));
        if let Some(exporter) = exporter {
            builder = builder.with_reader(exporter);
        }
        let provider = builder.build();
        let meter = provider.meter(METER_NAME);
        let observer: Arc<Mutex<Option<Weak<dyn NodeObserver>>>> = Arc::default();
        register_observed(&meter, &observer);
        let histogram_f64 = |name: &'static str, description: &'static str, bounds: &[f64]| {
            meter
                .f64_histogram(name)
                .with_description(description)
                .with_boundaries(bounds.to_vec())
                .build()
        };
        let histogram_u64 = |name: &'static str, description: &'static str, bounds: &[f64]| {
            meter
                .u64_histogram(name)
                .with_description(description)
                .with_boundaries(bounds.to_vec())
                .build()
        };
        NodeMetrics {
            leases_completed: meter
                .u64_counter("leases_completed_total")
                .with_description("Leases this node completed (the run returned a result)")
                .build(),
            leases_failed: meter
                .u64_counter("leases_failed_total")
                .with_description("Leases this node failed, by failure kind (hand-backs are node.unavailable)")
                .build(),
            execution_errors: meter
                .u64_counter("agent_execution_errors_total")
                .with_description("Runs that started in the sandbox and failed, by agent and failure kind")
                .build(),
            processing_ms: histogram_f64(
                "lease_processing_duration_ms",
                "Lease received to outcome, milliseconds",
                DURATION_MS,
            ),
            execution_ms: histogram_f64(
                "agent_execution_duration_ms",
                "Time inside the sandbox, milliseconds",
                DURATION_MS,
            ),
            tokens: histogram_u64("agent_tokens_total", "LLM tokens (in plus out) per run", TOKENS),
            cost: histogram_f64("agent_cost_usd", "LLM cost per run, US dollars", COST_USD),
            fuel: histogram_u64("agent_fuel_consumed", "Fuel consumed per run", FUEL),
            peak_memory: histogram_u64(
                "agent_peak_memory_bytes",
                "Peak linear memory per run, bytes",
                MEMORY_BYTES,
            ),
            instantiate_us: histogram_u64(
                "agent_instantiate_duration_us",
                "Component instantiation per run, microseconds",
                INSTANTIATE_US,
            ),
            provider,
            reader,
            observer,
        }
    }

    /// The worker's counts, observed from now on. The metrics hold it
    /// weakly: a stopped node reads as zeros, not as its last values.
    pub fn observe(&self, observer: Weak<dyn NodeObserver>) {
        *lock(&self.observer) = Some(observer);
    }

    /// Records the end of one lease.
    pub fn run_finished(&self, run: &FinishedRun<'_>) {
        let agent = KeyValue::new("agent.id", run.agent_id.to_string());
        let outcome = KeyValue::new("outcome", if run.fail_kind.is_some() { "failed" } else { "completed" });
        match run.fail_kind {
            None => self.leases_completed.add(1, &[]),
            Some(kind) => {
                self.leases_failed.add(1, &[KeyValue::new("kind", kind)]);
                if run.executed {
                    self.execution_errors
                        .add(1, &[agent.clone(), KeyValue::new("kind", kind)]);
                }
            }
        }
        self.processing_ms
            .record(run.processing.as_secs_f64() * 1000.0, std::slice::from_ref(&outcome));
        if !run.executed {
            return;
        }
        let attributes = [agent, outcome];
        self.execution_ms.record(run.execution_ms as f64, &attributes);
        self.tokens.record(run.tokens, &attributes);
        self.cost.record(run.usd_cost, &attributes);
        self.fuel.record(run.fuel_consumed, &attributes);
        self.peak_memory.record(run.peak_memory_bytes, &attributes);
        self.instantiate_us.record(run.instantiate_us, &attributes);
    }

    /// Reads every instrument now (observers included).
    pub fn collect(&self) -> Result<ResourceMetrics, String> {
        let mut metrics = ResourceMetrics::default();
        self.reader
            .collect(&mut metrics)
            .map_err(|err| format!("cannot collect the metrics: {err}"))?;
        Ok(metrics)
    }

    /// The metrics in the Prometheus text format (version 0.0.4).
    pub fn prometheus_text(&self) -> Result<String, String> {
        Ok(super::prometheus::render(&self.collect()?))
    }

    /// Exports what is pending and stops the exporter (bounded by its
    /// timeout). Blocking.
    pub(crate) fn shutdown(&self) {
        // Shutting down collects and exports one last time.
        let _ = self.provider.shutdown_with_timeout(super::otlp::EXPORT_TIMEOUT);
    }
}

/// The counters and gauges read from the worker at each collection.
fn register_observed(meter: &Meter, observer: &Arc<Mutex<Option<Weak<dyn NodeObserver>>>>) {
    let read = {
        let observer = observer.clone();
        move || -> Option<Arc<dyn NodeObserver>> { lock(&observer).as_ref()?.upgrade() }
    };
    type Pick = fn(&NodeCounts) -> u64;
    let counters: [(&'static str, &'static str, Pick); 13] = [
        (
            "leases_received_total",
            "Leases received on the lease stream (duplicates included)",
            |c| c.leases_received,
        ),
        ("leases_acknowledged_total", "Acks the control plane accepted", |c| {
            c.leases_acknowledged
        }),
        (
            "leases_without_id_total",
            "Leases refused because their lease id was empty (they cannot be acknowledged or failed)",
            |c| c.leases_without_id,
        ),
        (
            "leases_interrupted_total",
            "Leases found in flight at start-up (the node died while they ran), failed retryable",
            |c| c.leases_interrupted,
        ),
        (
            "lease_messages_too_large_total",
            "Lease messages larger than MaxLeaseMessageBytes: undecodable, so neither acknowledged nor failed",
            |c| c.lease_messages_too_large,
        ),
        (
            "outbox_write_failures_total",
            "Outbox writes the disk refused (the node takes no leases until the outbox records again)",
            |c| c.outbox_write_failures,
        ),
        ("agent_executions_total", "Runs started in the sandbox", |c| {
            c.runs_started
        }),
        (
            "lease_stream_errors_total",
            "Lease streams that could not be opened or broke",
            |c| c.lease_stream_errors,
        ),
        (
            "lease_stream_reconnects_total",
            "Lease streams reopened after the first",
            |c| c.lease_stream_reconnects,
        ),
        (
            "heartbeat_failures_total",
            "Heartbeats that got no answer or an error",
            |c| c.heartbeat_failures,
        ),
        (
            "reports_delivered_total",
            "Complete and Fail reports the control plane accepted",
            |c| c.reports_delivered,
        ),
        (
            "agent_compile_cache_hits_total",
            "Agent resolutions served without compiling (agent store or sandbox cache)",
            |c| c.compile_cache_hits,
        ),
        (
            "agent_compile_cache_misses_total",
            "Agent loads that compiled the component",
            |c| c.compile_cache_misses,
        ),
    ];
    for (name, description, pick) in counters {
        let read = read.clone();
        // The instrument lives as long as the provider once its callback
        // is registered; the handle itself need not be kept.
        let _ = meter
            .u64_observable_counter(name)
            .with_description(description)
            .with_callback(move |observe| {
                let value = read().map_or(0, |o| pick(&o.counts()));
                observe.observe(value, &[]);
            })
            .build();
    }
    let dropped = read.clone();
    let _ = meter
        .u64_observable_counter("outbox_reports_dropped_total")
        .with_description(
            "Reports dropped from the outbox: expired past the lease deadline plus grace, or over the size bound",
        )
        .with_callback(move |observe| {
            observe.observe(dropped().map_or(0, |o| o.counts().reports_dropped), &[]);
        })
        .build();
    let gauges: [(&'static str, &'static str, Pick); 3] = [
        ("active_leases", "Runs holding a slot now", |c| c.active_leases),
        (
            "outbox_writable",
            "1 while the outbox records, 0 while it cannot (no leases are taken meanwhile)",
            |c| c.outbox_writable,
        ),
        (
            "available_slots",
            "Free slots, as the last heartbeat reports them",
            |c| c.available_slots,
        ),
    ];
    for (name, description, pick) in gauges {
        let read = read.clone();
        let _ = meter
            .u64_observable_gauge(name)
            .with_description(description)
            .with_callback(move |observe| {
                if let Some(observer) = read() {
                    observe.observe(pick(&observer.counts()), &[]);
                }
            })
            .build();
    }
    let depth = read.clone();
    let _ = meter
        .u64_observable_gauge("outbox_depth")
        .with_description("Reports in the outbox, not yet accepted by the control plane")
        .with_callback(move |observe| {
            if let Some(backlog) = depth().and_then(|o| o.outbox_backlog()) {
                observe.observe(backlog.depth, &[]);
            }
        })
        .build();
    let age = read;
    let _ = meter
        .f64_observable_gauge("outbox_oldest_age_seconds")
        .with_description("Age of the oldest report in the outbox, seconds (0 when empty)")
        .with_callback(move |observe| {
            if let Some(backlog) = age().and_then(|o| o.outbox_backlog()) {
                observe.observe(backlog.oldest_age.as_secs_f64(), &[]);
            }
        })
        .build();
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl NodeObserver for Fixed {
        fn counts(&self) -> NodeCounts {
            NodeCounts {
                leases_received: 3,
                available_slots: 2,
                ..NodeCounts::default()
            }
        }
        fn outbox_backlog(&self) -> Option<OutboxBacklog> {
            Some(OutboxBacklog {
                depth: 1,
                oldest_age: Duration::from_secs(5),
            })
        }
    }

    #[test]
    fn every_listed_metric_is_exported_and_none_carries_a_lease_id() {
        let metrics = NodeMetrics::default();
        let observer: Arc<dyn NodeObserver> = Arc::new(Fixed);
        metrics.observe(Arc::downgrade(&observer));
        metrics.run_finished(&FinishedRun {
            agent_id: "echo",
            fail_kind: Some("budget.fuel"),
            executed: true,
            fuel_consumed: 10,
            ..FinishedRun::default()
        });
        metrics.run_finished(&FinishedRun {
            agent_id: "echo",
            executed: true,
            ..FinishedRun::default()
        });
        let text = metrics.prometheus_text().unwrap();
        for name in METRIC_NAMES {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from:\n{text}"
            );
        }
        assert!(text.contains("leases_received_total 3\n"), "{text}");
        assert!(text.contains("available_slots 2\n"), "{text}");
        assert!(text.contains("leases_failed_total{kind=\"budget.fuel\"} 1\n"), "{text}");
        assert!(text.contains("outbox_oldest_age_seconds 5\n"), "{text}");
        assert!(!text.contains("lease_id") && !text.contains("run_id"), "{text}");
        // A stopped node reads as absent, not as its last values.
        drop(observer);
        let text = metrics.prometheus_text().unwrap();
        assert!(!text.contains("available_slots 2"), "{text}");
    }
}
