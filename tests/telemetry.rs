//! Telemetry end to end: OTLP export, the admin endpoint, log formats.
