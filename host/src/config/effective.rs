//! The effective configuration, printed back in the reference's shape.
//!
//! `node-runtime config check` shows what the node would run with: every
//! section and key under the reference's names, defaults filled in, the
//! environment applied, paths resolved. Secrets print as `"***"` when set
//! (the API key, and a password inside a URL); certificate and key paths
//! are not secrets. The output is itself a valid configuration.
//!
//! The shape is spelt out in structs rather than built as a
//! `serde_json::Value`, whose maps would sort the sections alphabetically.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::{LogLevel, NodeConfig};
use crate::sandbox::AllocatorChoice;

const REDACTED: &str = "***";

pub(super) fn redacted_json(config: &NodeConfig) -> String {
    let view = View::of(config);
    serde_json::to_string_pretty(&view).expect("the configuration view serialises")
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct View<'a> {
    node_runtime: NodeRuntime<'a>,
    #[serde(rename = "MTls")]
    mtls: MTls,
    agent_runtime: AgentRuntime<'a>,
    open_telemetry: OpenTelemetry<'a>,
    logging: Logging<'a>,
    sandbox: Sandbox<'a>,
    agent_store: AgentStore<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct NodeRuntime<'a> {
    node_id: &'a str,
    control_plane_url: String,
    max_concurrent_leases: u32,
    heartbeat_interval_seconds: u64,
    capacity: Capacity<'a>,
    metadata: &'a BTreeMap<String, String>,
    agents_directory: String,
    data_directory: String,
    drain_timeout_seconds: u64,
    admin_listen: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Capacity<'a> {
    slots: u32,
    cpu: &'a str,
    memory: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct MTls {
    enabled: bool,
    client_certificate_path: Option<String>,
    client_key_path: Option<String>,
    server_ca_certificate_path: Option<String>,
    expected_server_certificate_subject: Option<String>,
    validate_certificate_chain: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct AgentRuntime<'a> {
    default_model: &'a str,
    default_temperature: f64,
    max_tokens: u32,
    max_duration_seconds: u64,
    #[serde(rename = "AzureAIFoundry")]
    azure_ai_foundry: AzureAiFoundry<'a>,
    #[serde(rename = "OpenAI")]
    openai: OpenAi<'a>,
    prices: BTreeMap<&'a str, Price>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct OpenAi<'a> {
    endpoint: Option<String>,
    api_key: Option<&'static str>,
    api_key_environment_variable: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Price {
    #[serde(rename = "InputPer1K")]
    input_per_1k: f64,
    #[serde(rename = "OutputPer1K")]
    output_per_1k: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct AzureAiFoundry<'a> {
    endpoint: Option<String>,
    deployment_name: Option<&'a str>,
    api_key: Option<&'static str>,
    use_managed_identity: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct OpenTelemetry<'a> {
    service_name: &'a str,
    service_version: &'a str,
    otlp_exporter: OtlpExporter,
    console_exporter: Enabled,
    traces: Traces,
    metrics: Metrics,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct OtlpExporter {
    /// Empty when the exporter is off, which is how the file says so.
    endpoint: String,
    protocol: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Enabled {
    enabled: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Traces {
    enabled: bool,
    sampling_ratio: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Metrics {
    enabled: bool,
    export_interval_milliseconds: u128,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Logging<'a> {
    log_level: BTreeMap<&'a str, &'static str>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Sandbox<'a> {
    default_fuel: u64,
    max_memory_bytes: u64,
    max_table_elements: u32,
    max_result_bytes: usize,
    max_log_lines: u32,
    max_log_bytes: usize,
    allocator: &'static str,
    engine: &'static str,
    allowed_hosts: &'a BTreeMap<String, Vec<String>>,
    compiled_cache_max_bytes: u64,
    grants: BTreeMap<&'a str, AgentGrants<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct AgentStore<'a> {
    sources: Vec<&'static str>,
    http_url_template: Option<&'a str>,
    oci_reference_template: Option<&'a str>,
    oci_insecure: bool,
    oci_username: Option<&'a str>,
    oci_password: Option<&'static str>,
    max_download_bytes: u64,
    download_timeout_seconds: u64,
    require_digest: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct AgentGrants<'a> {
    directories: Vec<Directory<'a>>,
    environment: &'a [String],
    allowed_hosts: &'a [String],
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Directory<'a> {
    host_path: String,
    guest_path: &'a str,
    read_only: bool,
}

impl<'a> View<'a> {
    fn of(config: &'a NodeConfig) -> Self {
        let node = &config.node_runtime;
        let mtls = &config.mtls;
        let agent = &config.agent_runtime;
        let foundry = &agent.azure_ai_foundry;
        let agent_openai = &agent.openai;
        let otel = &config.open_telemetry;
        let sandbox = &config.sandbox;
        View {
            node_runtime: NodeRuntime {
                node_id: &node.node_id,
                control_plane_url: redact_url(&node.control_plane_url),
                max_concurrent_leases: node.max_concurrent_leases,
                heartbeat_interval_seconds: node.heartbeat_interval.as_secs(),
                capacity: Capacity {
                    slots: node.capacity.slots,
                    cpu: &node.capacity.cpu,
                    memory: &node.capacity.memory,
                },
                metadata: &node.metadata,
                agents_directory: path(&node.agents_directory),
                data_directory: path(&node.data_directory),
                drain_timeout_seconds: node.drain_timeout.as_secs(),
                admin_listen: node.admin_listen.map(|addr| addr.to_string()),
            },
            mtls: MTls {
                enabled: mtls.enabled,
                client_certificate_path: mtls.client_certificate_path.as_deref().map(path),
                client_key_path: mtls.client_key_path.as_deref().map(path),
                server_ca_certificate_path: mtls.server_ca_certificate_path.as_deref().map(path),
                expected_server_certificate_subject: mtls.expected_server_certificate_subject.clone(),
                validate_certificate_chain: mtls.validate_certificate_chain,
            },
            agent_runtime: AgentRuntime {
                default_model: &agent.default_model,
                default_temperature: agent.default_temperature,
                max_tokens: agent.max_tokens,
                max_duration_seconds: agent.max_duration.as_secs(),
                azure_ai_foundry: AzureAiFoundry {
                    endpoint: foundry.endpoint.as_ref().map(redact_url),
                    deployment_name: foundry.deployment_name.as_deref(),
                    api_key: foundry.api_key.as_ref().map(|_| REDACTED),
                    use_managed_identity: foundry.use_managed_identity,
                },
                openai: OpenAi {
                    endpoint: agent_openai.endpoint.as_ref().map(redact_url),
                    api_key: agent_openai.api_key.as_ref().map(|_| REDACTED),
                    api_key_environment_variable: agent_openai.api_key_environment_variable.as_deref(),
                },
                prices: config
                    .agent_runtime
                    .prices
                    .iter()
                    .map(|(model, price)| {
                        (
                            model.as_str(),
                            Price {
                                input_per_1k: price.input_per_1k,
                                output_per_1k: price.output_per_1k,
                            },
                        )
                    })
                    .collect(),
            },
            open_telemetry: OpenTelemetry {
                service_name: &otel.service_name,
                service_version: &otel.service_version,
                otlp_exporter: OtlpExporter {
                    endpoint: otel.otlp_exporter.endpoint.as_ref().map(redact_url).unwrap_or_default(),
                    protocol: otel.otlp_exporter.protocol.as_str(),
                },
                console_exporter: Enabled {
                    enabled: otel.console_exporter_enabled,
                },
                traces: Traces {
                    enabled: otel.traces.enabled,
                    sampling_ratio: otel.traces.sampling_ratio,
                },
                metrics: Metrics {
                    enabled: otel.metrics.enabled,
                    export_interval_milliseconds: otel.metrics.export_interval.as_millis(),
                },
            },
            logging: Logging {
                log_level: config
                    .logging
                    .log_level
                    .iter()
                    .map(|(category, level)| (category.as_str(), LogLevel::as_str(*level)))
                    .collect(),
            },
            sandbox: Sandbox {
                default_fuel: sandbox.default_fuel,
                max_memory_bytes: sandbox.max_memory_bytes,
                max_table_elements: sandbox.max_table_elements,
                max_result_bytes: sandbox.max_result_bytes,
                max_log_lines: sandbox.max_log_lines,
                max_log_bytes: sandbox.max_log_bytes,
                allocator: match sandbox.allocator {
                    AllocatorChoice::Auto => "auto",
                    AllocatorChoice::Pooling => "pooling",
                    AllocatorChoice::OnDemand => "on-demand",
                },
                engine: sandbox.engine.as_str(),
                allowed_hosts: &sandbox.allowed_hosts,
                compiled_cache_max_bytes: sandbox.compiled_cache_max_bytes,
                grants: sandbox
                    .grants
                    .iter()
                    .map(|(agent, grants)| {
                        let directories = grants
                            .directories
                            .iter()
                            .map(|d| Directory {
                                host_path: path(&d.host_path),
                                guest_path: &d.guest_path,
                                read_only: d.read_only,
                            })
                            .collect();
                        let view = AgentGrants {
                            directories,
                            environment: &grants.environment,
                            allowed_hosts: &grants.http_hosts,
                        };
                        (agent.as_str(), view)
                    })
                    .collect(),
            },
            agent_store: AgentStore {
                sources: config.agent_store.sources.iter().map(|kind| kind.as_str()).collect(),
                http_url_template: config.agent_store.http_url_template.as_deref(),
                oci_reference_template: config.agent_store.oci_reference_template.as_deref(),
                oci_insecure: config.agent_store.oci_insecure,
                oci_username: config.agent_store.oci_username.as_deref(),
                oci_password: config.agent_store.oci_password.as_ref().map(|_| REDACTED),
                max_download_bytes: config.agent_store.max_download_bytes,
                download_timeout_seconds: config.agent_store.download_timeout.as_secs(),
                require_digest: config.agent_store.require_digest,
            },
        }
    }
}

fn path(path: &Path) -> String {
    path.display().to_string()
}

/// `https://user:password@host/` prints as `https://***@host/`.
fn redact_url(uri: &http::Uri) -> String {
    let text = uri.to_string();
    match uri.authority() {
        Some(authority) if authority.as_str().contains('@') => {
            let host = authority.as_str().rsplit_once('@').map_or("", |(_, host)| host);
            text.replacen(authority.as_str(), &format!("{REDACTED}@{host}"), 1)
        }
        _ => text,
    }
}
