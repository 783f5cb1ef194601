//! `OpenTelemetry`: the service's name, the OTLP exporter, traces and
//! metrics. Their types and defaults, their binding, and their printed
//! view, so that each of their keys is spelt here only.

use std::time::Duration;

use serde::Serialize;

use crate::config::effective::redact_url;
use crate::config::error::ConfigError;
use crate::config::reader::{Reader, Section};
use crate::telemetry::OtlpProtocol;

/// `OpenTelemetry`.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenTelemetrySection {
    /// `ServiceName`.
    pub service_name: String,
    /// `ServiceVersion` (default: this node's version).
    pub service_version: String,
    /// `OtlpExporter`.
    pub otlp_exporter: OtlpExporter,
    /// `ConsoleExporter.Enabled`.
    pub console_exporter_enabled: bool,
    /// `Traces`.
    pub traces: Traces,
    /// `Metrics`.
    pub metrics: Metrics,
}

/// `OpenTelemetry.OtlpExporter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpExporter {
    /// `Endpoint`: `None` when set to an empty string, which (as in the
    /// reference) turns the OTLP exporter off.
    pub endpoint: Option<http::Uri>,
    /// `Protocol`.
    pub protocol: OtlpProtocol,
}

/// `OpenTelemetry.Traces`.
#[derive(Debug, Clone, PartialEq)]
pub struct Traces {
    /// `Enabled`.
    pub enabled: bool,
    /// `SamplingRatio`: in [0, 1].
    pub sampling_ratio: f64,
}

/// `OpenTelemetry.Metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metrics {
    /// `Enabled`.
    pub enabled: bool,
    /// `ExportIntervalMilliseconds`: at least 1 ms.
    pub export_interval: Duration,
}

impl Default for OpenTelemetrySection {
    fn default() -> Self {
        OpenTelemetrySection {
            service_name: "Node.Runtime".to_string(),
            service_version: env!("CARGO_PKG_VERSION").to_string(),
            otlp_exporter: OtlpExporter::default(),
            console_exporter_enabled: false,
            traces: Traces::default(),
            metrics: Metrics::default(),
        }
    }
}

impl Default for OtlpExporter {
    fn default() -> Self {
        OtlpExporter {
            endpoint: Some(http::Uri::from_static("http://localhost:4317")),
            protocol: OtlpProtocol::Grpc,
        }
    }
}

impl Default for Traces {
    fn default() -> Self {
        Traces {
            enabled: true,
            sampling_ratio: 1.0,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            enabled: true,
            export_interval: Duration::from_millis(60_000),
        }
    }
}

pub(in crate::config) fn bind(
    reader: &mut Reader<'_>,
    root: &mut Section,
) -> Result<OpenTelemetrySection, ConfigError> {
    let defaults = OpenTelemetrySection::default();
    let mut s = reader.section(root, "OpenTelemetry")?;
    let service_name = reader.required_text(
        &mut s,
        "ServiceName",
        &defaults.service_name,
        "a non-empty service name, e.g. Node.Runtime",
    )?;
    let service_version = reader.text(&mut s, "ServiceVersion", &defaults.service_version)?;

    let mut exporter = reader.section(&mut s, "OtlpExporter")?;
    let otlp_exporter = OtlpExporter {
        endpoint: reader
            .url(&mut exporter, "Endpoint", "http://localhost:4317", true)?
            .unwrap_or(defaults.otlp_exporter.endpoint),
        protocol: reader.value(
            &mut exporter,
            "Protocol",
            defaults.otlp_exporter.protocol,
            "grpc or http/protobuf",
            |scalar| {
                let text = scalar.text()?;
                let text = text.trim();
                if text.eq_ignore_ascii_case("grpc") {
                    Some(OtlpProtocol::Grpc)
                } else if text.eq_ignore_ascii_case("http/protobuf") || text.eq_ignore_ascii_case("HttpProtobuf") {
                    Some(OtlpProtocol::HttpProtobuf)
                } else {
                    None
                }
            },
        )?,
    };
    reader.finish(exporter);

    let mut console = reader.section(&mut s, "ConsoleExporter")?;
    let console_exporter_enabled = reader.boolean(&mut console, "Enabled", defaults.console_exporter_enabled)?;
    reader.finish(console);

    let mut traces = reader.section(&mut s, "Traces")?;
    let traces_config = Traces {
        enabled: reader.boolean(&mut traces, "Enabled", defaults.traces.enabled)?,
        sampling_ratio: reader.value(
            &mut traces,
            "SamplingRatio",
            defaults.traces.sampling_ratio,
            "a number from 0 to 1 (the fraction of traces kept), e.g. 1.0",
            |scalar| scalar.float().filter(|r| (0.0..=1.0).contains(r)),
        )?,
    };
    reader.finish(traces);

    let mut metrics = reader.section(&mut s, "Metrics")?;
    let metrics_config = Metrics {
        enabled: reader.boolean(&mut metrics, "Enabled", defaults.metrics.enabled)?,
        export_interval: Duration::from_millis(reader.integer(
            &mut metrics,
            "ExportIntervalMilliseconds",
            defaults.metrics.export_interval.as_millis() as u64,
            1..=i32::MAX as i128,
            "a whole number of milliseconds greater than 0, e.g. 60000",
        )?),
    };
    reader.finish(metrics);
    reader.finish(s);
    Ok(OpenTelemetrySection {
        service_name,
        service_version,
        otlp_exporter,
        console_exporter_enabled,
        traces: traces_config,
        metrics: metrics_config,
    })
}

/// `OpenTelemetry` as `config check` prints it.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::config) struct View<'a> {
    service_name: &'a str,
    service_version: &'a str,
    otlp_exporter: OtlpExporterView,
    console_exporter: EnabledView,
    traces: TracesView,
    metrics: MetricsView,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct OtlpExporterView {
    /// Empty when the exporter is off, which is how the file says so.
    endpoint: String,
    protocol: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct EnabledView {
    enabled: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct TracesView {
    enabled: bool,
    sampling_ratio: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct MetricsView {
    enabled: bool,
    export_interval_milliseconds: u128,
}

impl<'a> View<'a> {
    pub(in crate::config) fn of(otel: &'a OpenTelemetrySection) -> Self {
        View {
            service_name: &otel.service_name,
            service_version: &otel.service_version,
            otlp_exporter: OtlpExporterView {
                endpoint: otel.otlp_exporter.endpoint.as_ref().map(redact_url).unwrap_or_default(),
                protocol: otel.otlp_exporter.protocol.as_str(),
            },
            console_exporter: EnabledView {
                enabled: otel.console_exporter_enabled,
            },
            traces: TracesView {
                enabled: otel.traces.enabled,
                sampling_ratio: otel.traces.sampling_ratio,
            },
            metrics: MetricsView {
                enabled: otel.metrics.enabled,
                export_interval_milliseconds: otel.metrics.export_interval.as_millis(),
            },
        }
    }
}
