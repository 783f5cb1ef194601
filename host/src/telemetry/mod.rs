//! Telemetry: the one owner of the `tracing` subscriber, the OpenTelemetry
//! providers (traces, metrics, logs over OTLP) and the metrics registry
//! behind the admin endpoint.
//!
//! The rest of the node only uses `tracing` spans and events, and records
//! run results into [`NodeMetrics`]; nothing else touches OpenTelemetry.
//! [`Telemetry::init`] turns that into:
//! - log lines on stderr, human-readable or JSON (`--log-format`), filtered
//!   by `Logging.LogLevel` unless `RUST_LOG` is set, each one line with
//!   credentials in URLs redacted, the client crates never below `info`,
//!   those below `WARN` gathered for up to 2 ms and written together
//!   (`log_line.rs`);
//! - spans exported over OTLP (the `node_runtime` crate's spans at info
//!   level and above), each lease's span adopting the lease's trace id
//!   ([`adopt_trace_id`]);
//! - log records exported over OTLP, carrying the run's ids from the
//!   enclosing span;
//! - metrics read by a periodic OTLP exporter and by `/metrics`.
//!
//! Every exporter is batched with a bounded queue and a timeout on its own
//! thread: a collector that is down costs dropped telemetry, never a
//! slower or stuck node. While no collector listens at the endpoint (the
//! default endpoint, set whether or not one runs), spans and log records
//! are not built at all (`collector.rs`).

pub mod admin;
mod collector;
mod log_line;
mod metrics;
mod otlp;
mod prometheus;

use std::io::IsTerminal;
use std::str::FromStr;
use std::sync::Arc;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter, Targets, filter_fn};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

pub use admin::{AdminError, AdminServer, Readiness, ReadinessProbe};
pub use metrics::{FinishedRun, METER_NAME, METRIC_NAMES, NodeCounts, NodeMetrics, NodeObserver, OutboxBacklog};
pub use otlp::{OtlpProtocol, OtlpSettings, ResourceIdentity};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event, with the enclosing spans' fields.
    #[default]
    Human,
    /// One JSON object per line, the spans' fields under `spans`.
    Json,
}

/// Everything [`Telemetry::init`] needs.
#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    /// A `tracing` filter (`info,node_runtime=debug`); `RUST_LOG`, when
    /// set, wins.
    pub log_filter: String,
    /// `OpenTelemetry.ConsoleExporter.Enabled`: also write each span to
    /// stderr when it closes, with its fields and timings.
    pub console_spans: bool,
    /// None: no OTLP export (metrics are still kept for `/metrics`).
    pub otlp: Option<OtlpSettings>,
    pub resource: ResourceIdentity,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter `{filter}` ({source}); fix Logging.LogLevel or RUST_LOG")]
    Filter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error(transparent)]
    Otlp(#[from] otlp::OtlpError),
    #[error("a logger is installed already in this process: {0}")]
    AlreadyInstalled(String),
}

/// The installed telemetry. Keep it for the life of the process and call
/// [`Telemetry::shutdown`] at exit, so what is queued gets exported.
pub struct Telemetry {
    metrics: Arc<NodeMetrics>,
    providers: otlp::Providers,
    /// Writes the log lines that wait when dropped.
    lines: Option<log_line::BatcherGuard>,
}

impl Telemetry {
    /// Installs the process's subscriber and providers. Must run inside
    /// the tokio runtime (the gRPC exporters need it). Once per process.
    pub fn init(settings: TelemetrySettings) -> Result<Telemetry, TelemetryError> {
        let filter = match std::env::var("RUST_LOG") {
            Ok(from_env) if !from_env.trim().is_empty() => from_env,
            _ => settings.log_filter.clone(),
        };
        let env_filter = |filter: &str| {
            EnvFilter::from_str(filter).map_err(|source| TelemetryError::Filter {
                filter: filter.to_string(),
                source,
            })
        };
        let stderr_filter = env_filter(&filter)?;
        let most_verbose = stderr_filter.max_level_hint();
        let (providers, meter_reader) = match &settings.otlp {
            Some(otlp) => otlp::Providers::build(otlp, &settings.resource)?,
            None => (otlp::Providers::default(), None),
        };
        let metrics = Arc::new(NodeMetrics::new(
            settings.resource.resource(settings.otlp.as_ref()),
            meter_reader,
        ));

        let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = Vec::new();
        let span_events = if settings.console_spans {
            FmtSpan::CLOSE
        } else {
            FmtSpan::NONE
        };
        let console_spans = settings.console_spans;
        let stderr = stderr_layer(settings.log_format, span_events)
            .with_filter(
                stderr_filter
                    .and(filter_fn(log_line::capped))
                    .and(filter_fn(move |metadata| {
                        console_spans || log_line::on_stderr(metadata)
                    })),
            )
            .boxed();
        layers.push(stderr);
        // The OTLP layers sit behind one gate of their own: while no
        // collector listens, a span is asked about once for both (one
        // lookup at each enter and exit, not one per layer), and a callsite
        // that only they would take is not asked about at all. The gate's
        // answer is cached per callsite; the collector rebuilds the cache
        // when it changes (`collector.rs`).
        let mut otlp: Vec<Box<dyn Layer<Registry> + Send + Sync>> = Vec::new();
        let mut otlp_most_verbose = LevelFilter::OFF;
        if let Some(tracer) = providers.tracer() {
            // The node's own spans; the libraries' (hyper, h2, tonic) would
            // only be noise, and the exporter's own would feed back.
            let targets = Targets::new().with_target("node_runtime", tracing::Level::INFO);
            otlp_most_verbose = otlp_most_verbose.max(LevelFilter::INFO);
            otlp.push(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_threads(false)
                    .with_filter(targets)
                    .boxed(),
            );
        }
        if let Some(logger) = &providers.logger {
            // As on stderr, but never the transport crates: exporting a log
            // record must not log (and so export) again. A filter of its
            // own, as a module's directive in RUST_LOG would win over `=off`.
            let quiet = filter_fn(|metadata| !log_line::of_crates(metadata.target(), EXPORTER_CRATES));
            let logs_filter = env_filter(&filter)?;
            otlp_most_verbose = otlp_most_verbose.max(logs_filter.max_level_hint().unwrap_or(LevelFilter::TRACE));
            otlp.push(
                opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::builder(logger)
                    .with_tracing_span_attributes(
                        opentelemetry_appender_tracing::layer::TracingSpanAttributes::allowlist(
                            RUN_FIELDS.iter().copied(),
                        ),
                    )
                    .build()
                    .with_filter(logs_filter.and(filter_fn(log_line::capped)).and(quiet))
                    .boxed(),
            );
        }
        if !otlp.is_empty() {
            let collector = providers.collector.clone();
            let listening = filter_fn(move |metadata| {
                otlp_most_verbose >= *metadata.level() && collector.as_ref().is_none_or(collector::Collector::listening)
            })
            .with_max_level_hint(otlp_most_verbose);
            layers.push(otlp.with_filter(listening).boxed());
        }
        tracing_subscriber::registry()
            .with(layers)
            .try_init()
            .map_err(|err| TelemetryError::AlreadyInstalled(err.to_string()))?;
        let lines = log_line::Batcher::start();
        log::set_max_level(log_level(most_verbose));
        if let Some(otlp) = &settings.otlp {
            tracing::info!(
                endpoint = %otlp.endpoint,
                protocol = otlp.protocol.as_str(),
                traces = otlp.traces,
                metrics = otlp.metrics_interval.is_some(),
                "exporting telemetry over OTLP"
            );
        }
        Ok(Telemetry {
            metrics,
            providers,
            lines,
        })
    }

    /// The metrics registry: give it to the worker and the admin endpoint.
    pub fn metrics(&self) -> Arc<NodeMetrics> {
        self.metrics.clone()
    }

    /// Exports what is queued and stops the exporters: the three signals
    /// at once, each bounded by the export timeout, so a silent collector
    /// delays exit by that much at most.
    pub async fn shutdown(self) {
        let metrics = self.metrics.clone();
        let Telemetry { providers, lines, .. } = self;
        let otlp::Providers { tracer, logger, .. } = providers;
        let mut tasks = vec![tokio::task::spawn_blocking(move || metrics.shutdown())];
        if let Some(tracer) = tracer {
            tasks.push(tokio::task::spawn_blocking(move || {
                let _ = tracer.shutdown_with_timeout(otlp::EXPORT_TIMEOUT);
            }));
        }
        if let Some(logger) = logger {
            tasks.push(tokio::task::spawn_blocking(move || {
                let _ = logger.shutdown_with_timeout(otlp::EXPORT_TIMEOUT);
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
        drop(lines);
    }
}

/// Writes the daemon's log lines that wait to be written together
/// ([`Telemetry::init`] gathers them for a few milliseconds): call it
/// before writing on stderr by other means, so the order holds.
pub fn flush_log_lines() {
    log_line::flush();
}

/// How every logger of the node writes to stderr: one line per event in
/// `format`, through the safe writer ([`log_line::SafeStderr`]); colours
/// only on a terminal.
fn stderr_layer(format: LogFormat, span_events: FmtSpan) -> Box<dyn Layer<Registry> + Send + Sync> {
    match format {
        LogFormat::Human => {
            let colours = std::io::stderr().is_terminal();
            tracing_subscriber::fmt::layer()
                .with_writer(log_line::SafeStderr::human(colours))
                // Colours for a terminal; plain text for journald and files.
                .with_ansi(colours)
                .with_span_events(span_events)
                .boxed()
        }
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_span_events(span_events)
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(log_line::SafeStderr::json())
            .boxed(),
    }
}

/// A stderr logger for the moments before the configured one exists
/// (loading the configuration may warn): info and above, written as the
/// configured one writes.
pub fn loading_logger(format: LogFormat) -> impl tracing::Subscriber + Send + Sync {
    let level = tracing_subscriber::filter::LevelFilter::INFO;
    tracing_subscriber::registry().with(stderr_layer(format, FmtSpan::NONE).with_filter(level))
}

/// The `log` crate's own level for records of at most `most_verbose`
/// (TRACE when unknown). Its records (wasmtime writes them: some
/// two dozen debug and trace records per instantiation) cross into
/// `tracing` only below this level. `try_init` sets it from the
/// subscriber's hint, which was TRACE while the OTLP layers' gate gave
/// none: every record then crossed, to be dropped by the filters, about
/// 2% of the node's CPU per lease (bench `lease-cost`). Every layer that
/// takes log records uses the stderr filter, whose hint this is.
fn log_level(most_verbose: Option<LevelFilter>) -> log::LevelFilter {
    match most_verbose.unwrap_or(LevelFilter::TRACE).into_level() {
        None => log::LevelFilter::Off,
        Some(tracing::Level::ERROR) => log::LevelFilter::Error,
        Some(tracing::Level::WARN) => log::LevelFilter::Warn,
        Some(tracing::Level::INFO) => log::LevelFilter::Info,
        Some(tracing::Level::DEBUG) => log::LevelFilter::Debug,
        Some(tracing::Level::TRACE) => log::LevelFilter::Trace,
    }
}

/// Installs a plain stderr logger for commands that need no telemetry
/// (`compile`, `outbox`, `config check`): `RUST_LOG`, else `default`.
pub fn init_plain_logging(default: &str) {
    let asked = std::env::var("RUST_LOG")
        .ok()
        .filter(|asked| EnvFilter::from_str(asked).is_ok())
        .unwrap_or_else(|| default.to_string());
    let filter = EnvFilter::from_str(&asked).unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::registry()
        .with(stderr_layer(LogFormat::Human, FmtSpan::NONE).with_filter(filter.and(filter_fn(log_line::capped))))
        .try_init();
}

/// The crates whose events the OTLP log bridge never exports, at any
/// level: the exporter's transport and the exporter itself.
const EXPORTER_CRATES: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "reqwest",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
];

/// The span fields that tie a log line to a run; OTLP log records copy
/// them from the enclosing span.
pub const RUN_FIELDS: &[&str] = &["run.id", "lease.id", "trace_id", "node.id", "agent.id", "agent.version"];

/// Makes `span` (a lease's span, not yet entered) part of the trace
/// `trace_id` (32 hex digits): its OpenTelemetry parent becomes a remote
/// span of that trace, so the whole tree shares the control plane's trace
/// id. A malformed id leaves the span a root of a new trace.
pub fn adopt_trace_id(span: &tracing::Span, trace_id: &str) {
    let Ok(trace_id) = TraceId::from_hex(trace_id) else {
        return;
    };
    if trace_id == TraceId::INVALID {
        return;
    }
    // The control plane's own span id is not on the wire: a stand-in
    // derived from the trace id, stable for every span of the lease.
    let bytes = trace_id.to_bytes();
    let mut low = [0u8; 8];
    low.copy_from_slice(&bytes[8..]);
    let span_id = match u64::from_be_bytes(low) {
        0 => SpanId::from_bytes(1u64.to_be_bytes()),
        n => SpanId::from_bytes(n.to_be_bytes()),
    };
    let parent = SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, true, TraceState::default());
    let context = opentelemetry::Context::new().with_remote_span_context(parent);
    let _ = span.set_parent(context);
}
