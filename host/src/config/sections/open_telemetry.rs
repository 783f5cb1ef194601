//! `OpenTelemetry`: the service's name, the OTLP exporter, traces and
//! metrics.

use std::time::Duration;

use crate::config::error::ConfigError;
use crate::config::reader::{Reader, Section};
use crate::config::{Metrics, OpenTelemetrySection, OtlpExporter, OtlpProtocol, Traces};

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
