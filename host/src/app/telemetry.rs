//! Logging and OpenTelemetry from the `Logging` and `OpenTelemetry`
//! sections.

use crate::config::NodeConfig;
use crate::telemetry::{LogFormat, OtlpSettings, ResourceIdentity, TelemetrySettings};

/// The telemetry settings: the log filter of `Logging.LogLevel`, the OTLP
/// exporter of `OpenTelemetry`, and the node's identity (`NodeId`, and
/// the `Region` and `Environment` of `NodeRuntime.Metadata`) on every
/// signal.
pub fn telemetry_settings(config: &NodeConfig, log_format: LogFormat) -> TelemetrySettings {
    let otel = &config.open_telemetry;
    let metadata = &config.node_runtime.metadata;
    let find = |key: &str| {
        metadata
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, value)| value.clone())
    };
    TelemetrySettings {
        log_format,
        log_filter: config.log_filter(),
        console_spans: otel.console_exporter_enabled,
        otlp: otel.otlp_exporter.endpoint.as_ref().map(|endpoint| OtlpSettings {
            endpoint: endpoint.to_string(),
            protocol: otel.otlp_exporter.protocol,
            service_name: otel.service_name.clone(),
            service_version: otel.service_version.clone(),
            traces: otel.traces.enabled,
            sampling_ratio: otel.traces.sampling_ratio,
            metrics_interval: otel.metrics.enabled.then_some(otel.metrics.export_interval),
            logs: true,
        }),
        resource: ResourceIdentity {
            node_id: config.node_runtime.node_id.clone(),
            region: find("Region"),
            environment: find("Environment"),
        },
    }
}
