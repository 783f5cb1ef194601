//! The OTLP exporters, from the reference's `OpenTelemetry` section: one
//! endpoint, `grpc` (tonic) or `http/protobuf` (`/v1/traces`,
//! `/v1/metrics`, `/v1/logs` under the endpoint), and the resource every
//! signal carries.
//!
//! Spans and log records go through the SDK's batch processors (a bounded
//! queue drained by a thread of their own; when full, records are
//! dropped), metrics through a periodic reader; every export is bounded by
//! [`EXPORT_TIMEOUT`]. Nothing on a run's path waits for the collector.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{LogExporter, MetricExporter, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::PeriodicReader;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

use super::collector::{Collector, Gated};
use super::metrics::METER_NAME;

/// How long one export may take before it is abandoned.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// How spans, metrics and logs reach the collector
/// (`OpenTelemetry.OtlpExporter.Protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OtlpProtocol {
    /// `grpc`
    #[default]
    Grpc,
    /// `http/protobuf`
    HttpProtobuf,
}

impl OtlpProtocol {
    /// The spelling the reference uses.
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// The `OpenTelemetry` section, as the exporters need it.
#[derive(Debug, Clone)]
pub struct OtlpSettings {
    /// `OtlpExporter.Endpoint`, e.g. `http://localhost:4317` (grpc) or
    /// `http://localhost:4318` (http/protobuf).
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub service_name: String,
    pub service_version: String,
    /// `Traces.Enabled`.
    pub traces: bool,
    /// `Traces.SamplingRatio`, in [0, 1], decided by trace id so that every
    /// node keeps or drops the same traces.
    pub sampling_ratio: f64,
    /// `Metrics.ExportIntervalMilliseconds` when `Metrics.Enabled`.
    pub metrics_interval: Option<Duration>,
    /// Log records over OTLP (on whenever an endpoint is set).
    pub logs: bool,
}

/// The node's identity in every signal's resource.
#[derive(Debug, Clone, Default)]
pub struct ResourceIdentity {
    pub node_id: String,
    /// `NodeRuntime.Metadata.Region`.
    pub region: Option<String>,
    /// `NodeRuntime.Metadata.Environment`.
    pub environment: Option<String>,
}

impl ResourceIdentity {
    /// `service.name`, `service.version`, `node.id`, `node.region`,
    /// `node.environment`, `host.arch`.
    pub fn resource(&self, otlp: Option<&OtlpSettings>) -> Resource {
        let (name, version) = otlp.map_or(("Node.Runtime", env!("CARGO_PKG_VERSION")), |o| {
            (o.service_name.as_str(), o.service_version.as_str())
        });
        let mut attributes = vec![
            KeyValue::new("service.version", version.to_string()),
            KeyValue::new("node.id", self.node_id.clone()),
            KeyValue::new("host.arch", host_arch()),
        ];
        if let Some(region) = &self.region {
            attributes.push(KeyValue::new("node.region", region.clone()));
        }
        if let Some(environment) = &self.environment {
            attributes.push(KeyValue::new("node.environment", environment.clone()));
        }
        Resource::builder_empty()
            .with_service_name(name.to_string())
            .with_attributes(attributes)
            .build()
    }
}

/// The OpenTelemetry spelling of the CPU architecture.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "x86",
        "arm" => "arm32",
        "powerpc64" => "ppc64",
        "s390x" => "s390x",
        other => other,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error(
        "cannot build the OTLP {signal} exporter for OpenTelemetry.OtlpExporter.Endpoint {endpoint} \
         ({protocol}): {message}; fix the endpoint (e.g. http://localhost:4317 for grpc, \
         http://localhost:4318 for http/protobuf) or set it to \"\" to turn OTLP off"
    )]
    Build {
        signal: &'static str,
        endpoint: String,
        protocol: &'static str,
        message: String,
    },
}

/// The trace and log providers (the meter provider lives in `NodeMetrics`),
/// and whether their collector listens.
#[derive(Default)]
pub(super) struct Providers {
    pub(super) tracer: Option<SdkTracerProvider>,
    pub(super) logger: Option<SdkLoggerProvider>,
    /// Told by every span and log export; `None` when neither is on.
    pub(super) collector: Option<Collector>,
}

impl Providers {
    /// Builds every enabled exporter; the metric one is returned as a
    /// reader for `NodeMetrics`.
    pub(super) fn build(
        settings: &OtlpSettings,
        identity: &ResourceIdentity,
    ) -> Result<(Providers, Option<PeriodicReader<MetricExporter>>), OtlpError> {
        let resource = identity.resource(Some(settings));
        let fail = |signal: &'static str| {
            move |err: opentelemetry_otlp::ExporterBuildError| OtlpError::Build {
                signal,
                endpoint: settings.endpoint.clone(),
                protocol: settings.protocol.as_str(),
                message: err.to_string(),
            }
        };
        let base = settings.endpoint.trim_end_matches('/');
        let grpc = settings.protocol == OtlpProtocol::Grpc;
        let collector = (settings.traces || settings.logs).then(|| Collector::watch(base));
        let tracer = if settings.traces {
            let exporter = if grpc {
                SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(base)
                    .with_timeout(EXPORT_TIMEOUT)
                    .build()
            } else {
                SpanExporter::builder()
                    .with_http()
                    .with_endpoint(format!("{base}/v1/traces"))
                    .with_timeout(EXPORT_TIMEOUT)
                    .build()
            }
            .map_err(fail("trace"))?;
            let exporter = Gated::new(exporter, collector.clone().expect("made when traces are on"));
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_sampler(Sampler::TraceIdRatioBased(settings.sampling_ratio.clamp(0.0, 1.0)))
                    .with_resource(resource.clone())
                    .build(),
            )
        } else {
            None
        };
        let logger = if settings.logs {
            let exporter = if grpc {
                LogExporter::builder()
                    .with_tonic()
                    .with_endpoint(base)
                    .with_timeout(EXPORT_TIMEOUT)
                    .build()
            } else {
                LogExporter::builder()
                    .with_http()
                    .with_endpoint(format!("{base}/v1/logs"))
                    .with_timeout(EXPORT_TIMEOUT)
                    .build()
            }
            .map_err(fail("log"))?;
            let exporter = Gated::new(exporter, collector.clone().expect("made when logs are on"));
            Some(
                SdkLoggerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource.clone())
                    .build(),
            )
        } else {
            None
        };
        let metrics = match settings.metrics_interval {
            Some(interval) => {
                let exporter = if grpc {
                    MetricExporter::builder()
                        .with_tonic()
                        .with_endpoint(base)
                        .with_timeout(EXPORT_TIMEOUT)
                        .build()
                } else {
                    MetricExporter::builder()
                        .with_http()
                        .with_endpoint(format!("{base}/v1/metrics"))
                        .with_timeout(EXPORT_TIMEOUT)
                        .build()
                }
                .map_err(fail("metric"))?;
                Some(PeriodicReader::builder(exporter).with_interval(interval).build())
            }
            None => None,
        };
        Ok((
            Providers {
                tracer,
                logger,
                collector,
            },
            metrics,
        ))
    }

    pub(super) fn tracer(&self) -> Option<SdkTracer> {
        self.tracer.as_ref().map(|provider| provider.tracer(METER_NAME))
    }
}
