//! The configuration, specified by example: the reference's file loads as
//! is, the environment overrides it the .NET way, and every bad value
//! stops start-up with a message that names its key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

pub(crate) fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn reference_file() -> PathBuf {
    fixtures().join("appsettings.reference.json")
}

pub(crate) fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

pub(crate) fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

/// Loads `json` as if it were a file in `/etc/node-runtime`.
pub(crate) fn load(json: &str) -> Result<NodeConfig, ConfigError> {
    NodeConfig::from_json_str(json, Path::new("/etc/node-runtime"), no_env())
}

#[test]
fn the_reference_appsettings_loads_unchanged_and_its_values_come_through() {
    let config = NodeConfig::load(&reference_file(), no_env()).unwrap();
    let fixtures = std::path::absolute(fixtures()).unwrap();

    let node = &config.node_runtime;
    assert_eq!(node.node_id, "node-eu-west-3");
    assert_eq!(node.control_plane_url, "https://control-plane:5109");
    assert_eq!(node.max_concurrent_leases, 4);
    assert_eq!(node.heartbeat_interval, Duration::from_secs(15));
    assert_eq!(
        node.capacity,
        CapacitySection {
            slots: 6,
            cpu: "2".into(),
            memory: "4Gi".into()
        }
    );
    assert_eq!(
        node.metadata.iter().collect::<Vec<_>>(),
        [
            (&"Environment".to_string(), &"staging".to_string()),
            (&"Region".to_string(), &"eu-west-1".to_string()),
        ]
    );

    let mtls = &config.mtls;
    assert!(!mtls.enabled);
    assert_eq!(
        mtls.client_certificate_path.as_deref(),
        Some(fixtures.join("certs/node.crt").as_path())
    );
    assert_eq!(
        mtls.client_key_path.as_deref(),
        Some(fixtures.join("certs/node.key").as_path())
    );
    assert_eq!(
        mtls.server_ca_certificate_path.as_deref(),
        Some(fixtures.join("certs/ca.crt").as_path())
    );
    assert_eq!(
        mtls.expected_server_certificate_subject.as_deref(),
        Some("control-plane")
    );
    assert!(mtls.validate_certificate_chain);

    let agent = &config.agent_runtime;
    assert_eq!(agent.default_model, "gpt-5-mini");
    assert_eq!(agent.default_temperature, 0.2);
    assert_eq!(agent.max_tokens, 8000);
    assert_eq!(agent.max_duration, Duration::from_secs(120));
    let foundry = &agent.azure_ai_foundry;
    assert_eq!(
        foundry.endpoint.as_ref().unwrap(),
        "https://bpa-foundry.services.ai.azure.com"
    );
    assert_eq!(foundry.deployment_name.as_deref(), Some("gpt-5-mini"));
    assert_eq!(
        foundry.api_key.as_ref().map(Secret::expose),
        Some("fixture-api-key-5c1e9b0d7a")
    );
    assert!(!foundry.use_managed_identity);

    let otel = &config.open_telemetry;
    assert_eq!(otel.service_name, "Node.Runtime");
    assert_eq!(otel.service_version, "1.0.0");
    assert_eq!(
        otel.otlp_exporter.endpoint.as_ref().unwrap(),
        "http://otel-collector:4318"
    );
    assert_eq!(otel.otlp_exporter.protocol, OtlpProtocol::HttpProtobuf);
    assert!(otel.console_exporter_enabled);
    assert_eq!(
        otel.traces,
        Traces {
            enabled: true,
            sampling_ratio: 0.25
        }
    );
    assert_eq!(
        otel.metrics,
        Metrics {
            enabled: false,
            export_interval: Duration::from_secs(30)
        }
    );

    assert_eq!(
        config.logging.log_level.get("Microsoft.AspNetCore"),
        Some(&LogLevel::Warning)
    );
    assert_eq!(config.log_filter(), "info,Grpc=debug,Microsoft.AspNetCore=warn");

    // Keys of the node's own that the reference file does not have.
    assert_eq!(node.agents_directory, fixtures.join("agents"));
    assert_eq!(node.data_directory, fixtures.join("data"));
    assert_eq!(node.drain_timeout, Duration::from_secs(30));
    assert_eq!(node.admin_listen, None, "no admin endpoint unless asked for");
    assert_eq!(config.sandbox, SandboxSection::default());

    assert_eq!(config.ignored_keys, ["AllowedHosts"]);
}

#[test]
fn an_empty_configuration_is_the_reference_defaults() {
    let config = load("{}").unwrap();
    let defaults = NodeConfig::default();
    assert_eq!(config.node_runtime.node_id, "node-1");
    assert_eq!(config.node_runtime.control_plane_url, "http://localhost:5109");
    assert_eq!(config.node_runtime.max_concurrent_leases, 5);
    assert_eq!(config.node_runtime.heartbeat_interval, Duration::from_secs(30));
    assert_eq!(config.node_runtime.capacity, CapacitySection::default());
    assert_eq!(config.agent_runtime.max_tokens, 4000);
    assert_eq!(config.agent_runtime.max_duration, Duration::from_secs(60));
    assert_eq!(config.open_telemetry.service_name, "Node.Runtime");
    assert_eq!(
        config.open_telemetry.otlp_exporter.endpoint.as_ref().unwrap(),
        "http://localhost:4317"
    );
    assert_eq!(
        config.open_telemetry.metrics.export_interval,
        Duration::from_millis(60_000)
    );
    assert!(config.mtls.validate_certificate_chain);
    // Everything else equals `Default`, but for paths, now resolved.
    assert_eq!(
        config.node_runtime.agents_directory,
        Path::new("/etc/node-runtime/agents")
    );
    assert_eq!(config.node_runtime.data_directory, Path::new("/etc/node-runtime/data"));
    let resolved = NodeConfig {
        node_runtime: NodeRuntimeSection {
            agents_directory: config.node_runtime.agents_directory.clone(),
            data_directory: config.node_runtime.data_directory.clone(),
            ..defaults.node_runtime
        },
        ..defaults
    };
    assert_eq!(config, resolved);
}

#[test]
fn environment_variables_override_the_file_the_dotnet_way() {
    let config = NodeConfig::load(
        &reference_file(),
        env(&[
            ("NodeRuntime__MaxConcurrentLeases", "2"),
            ("noderuntime__nodeid", "node-7"),
            ("NODERUNTIME__CAPACITY__SLOTS", "3"),
            ("NodeRuntime__Metadata__Zone", "b"),
            ("OpenTelemetry__ConsoleExporter__Enabled", "False"),
            ("OpenTelemetry:Traces:SamplingRatio", "0.5"),
            ("Logging__LogLevel__Default", "Debug"),
            ("NodeRuntime__AdminListen", "0.0.0.0:9090"),
            ("NodeRuntime__MaxLeaseMessageBytes", "5MiB"),
            ("NodeRuntime__CallsStream", "false"),
            // Not the node's sections: none of its business.
            ("PATH", "/usr/bin"),
            ("Kestrel__Endpoints__Http__Url", "http://*:80"),
            ("SANDBOX", "1"),
        ]),
    )
    .unwrap();
    assert_eq!(config.node_runtime.max_concurrent_leases, 2);
    assert_eq!(config.node_runtime.node_id, "node-7");
    assert_eq!(config.node_runtime.capacity.slots, 3);
    assert_eq!(config.node_runtime.metadata["Zone"], "b");
    assert_eq!(config.node_runtime.metadata["Region"], "eu-west-1");
    assert!(!config.open_telemetry.console_exporter_enabled);
    assert_eq!(config.open_telemetry.traces.sampling_ratio, 0.5);
    assert!(config.log_filter().starts_with("debug,"));
    assert_eq!(config.node_runtime.admin_listen, Some("0.0.0.0:9090".parse().unwrap()));
    assert_eq!(config.node_runtime.max_lease_message_bytes, 5 << 20);
    assert!(!config.node_runtime.calls_stream);
    assert!(NodeConfig::default().node_runtime.calls_stream, "on unless turned off");
    assert_eq!(config.ignored_keys, ["AllowedHosts"]);
}

#[test]
fn key_names_match_in_any_case_but_metadata_keys_keep_theirs() {
    let config = load(
        r#"{"noderuntime": {"NODEID": "n", "capacity": {"sLoTs": 2},
            "metadata": {"Region": "eu", "environment": "dev"}},
            "MTLS": {"enabled": false}}"#,
    )
    .unwrap();
    assert_eq!(config.node_runtime.node_id, "n");
    assert_eq!(config.node_runtime.capacity.slots, 2);
    assert_eq!(
        config.node_runtime.metadata.keys().collect::<Vec<_>>(),
        ["Region", "environment"]
    );
}

#[test]
fn numbers_and_booleans_written_as_strings_coerce() {
    let config = load(
        r#"{"NodeRuntime": {"MaxConcurrentLeases": "3", "HeartbeatIntervalSeconds": " 10 ",
            "Capacity": {"Slots": "12", "Cpu": 4}},
            "MTls": {"ValidateCertificateChain": "False"},
            "OpenTelemetry": {"Traces": {"SamplingRatio": "0.1"}}}"#,
    )
    .unwrap();
    assert_eq!(config.node_runtime.max_concurrent_leases, 3);
    assert_eq!(config.node_runtime.heartbeat_interval, Duration::from_secs(10));
    assert_eq!(config.node_runtime.capacity.slots, 12);
    assert_eq!(config.node_runtime.capacity.cpu, "4");
    assert!(!config.mtls.validate_certificate_chain);
    assert_eq!(config.open_telemetry.traces.sampling_ratio, 0.1);
}

#[test]
fn an_empty_string_or_null_leaves_the_default() {
    let config = load(
        r#"{"NodeRuntime": {"MaxConcurrentLeases": "", "Capacity": null},
            "OpenTelemetry": {"Traces": {"SamplingRatio": null}}}"#,
    )
    .unwrap();
    assert_eq!(config.node_runtime.max_concurrent_leases, 5);
    assert_eq!(config.node_runtime.capacity.slots, 8);
    assert_eq!(config.open_telemetry.traces.sampling_ratio, 1.0);
}

/// A configuration that must be refused, and what the refusal must say.
struct Case {
    what: &'static str,
    json: &'static str,
    env: &'static [(&'static str, &'static str)],
    /// The key the error names, and starts with.
    key: &'static str,
    /// Words of the fix the error must contain.
    fix: &'static str,
}

#[test]
fn every_bad_value_is_refused_with_an_error_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("not-a-dir"), "").unwrap();
    std::fs::write(dir.path().join("node.key"), "").unwrap();
    std::fs::write(dir.path().join("node.crt"), "").unwrap();
    let cases = [
        Case {
            what: "a URL that is not one",
            json: r#"{"NodeRuntime": {"ControlPlaneUrl": "control plane"}}"#,
            env: &[],
            key: "NodeRuntime.ControlPlaneUrl",
            fix: "http:// or https://",
        },
        Case {
            what: "an ftp URL",
            json: r#"{"NodeRuntime": {"ControlPlaneUrl": "ftp://control-plane:21"}}"#,
            env: &[],
            key: "NodeRuntime.ControlPlaneUrl",
            fix: "http:// or https://",
        },
        Case {
            what: "a URL without a host",
            json: r#"{"NodeRuntime": {"ControlPlaneUrl": "localhost:5109"}}"#,
            env: &[],
            key: "NodeRuntime.ControlPlaneUrl",
            fix: "with a host",
        },
        Case {
            what: "an empty URL",
            json: r#"{"NodeRuntime": {"ControlPlaneUrl": ""}}"#,
            env: &[],
            key: "NodeRuntime.ControlPlaneUrl",
            fix: "e.g. https://",
        },
        Case {
            what: "zero slots",
            json: r#"{"NodeRuntime": {"Capacity": {"Slots": 0}}}"#,
            env: &[],
            key: "NodeRuntime.Capacity.Slots",
            fix: "at least 1",
        },
        Case {
            what: "zero leases",
            json: r#"{"NodeRuntime": {"MaxConcurrentLeases": 0}}"#,
            env: &[],
            key: "NodeRuntime.MaxConcurrentLeases",
            fix: "at least 1",
        },
        Case {
            what: "a negative heartbeat",
            json: r#"{"NodeRuntime": {"HeartbeatIntervalSeconds": -5}}"#,
            env: &[],
            key: "NodeRuntime.HeartbeatIntervalSeconds",
            fix: "greater than 0",
        },
        Case {
            what: "a heartbeat that is not a number",
            json: r#"{"NodeRuntime": {"HeartbeatIntervalSeconds": "soon"}}"#,
            env: &[],
            key: "NodeRuntime.HeartbeatIntervalSeconds",
            fix: "whole number of seconds",
        },
        Case {
            what: "a fractional heartbeat",
            json: r#"{"NodeRuntime": {"HeartbeatIntervalSeconds": 1.5}}"#,
            env: &[],
            key: "NodeRuntime.HeartbeatIntervalSeconds",
            fix: "whole number of seconds",
        },
        Case {
            what: "a bad heartbeat from the environment",
            json: "{}",
            env: &[("NodeRuntime__HeartbeatIntervalSeconds", "0")],
            key: "NodeRuntime.HeartbeatIntervalSeconds",
            fix: "greater than 0",
        },
        Case {
            what: "an admin address without a port",
            json: r#"{"NodeRuntime": {"AdminListen": "localhost"}}"#,
            env: &[],
            key: "NodeRuntime.AdminListen",
            fix: "127.0.0.1:9090",
        },
        Case {
            what: "a lease message limit too small for a lease",
            json: r#"{"NodeRuntime": {"MaxLeaseMessageBytes": 1000}}"#,
            env: &[],
            key: "NodeRuntime.MaxLeaseMessageBytes",
            fix: "at least 64KiB",
        },
        Case {
            what: "a calls stream neither on nor off",
            json: r#"{"NodeRuntime": {"CallsStream": "sometimes"}}"#,
            env: &[],
            key: "NodeRuntime.CallsStream",
            fix: "true or false",
        },
        Case {
            what: "a negative drain timeout",
            json: r#"{"NodeRuntime": {"DrainTimeoutSeconds": -1}}"#,
            env: &[],
            key: "NodeRuntime.DrainTimeoutSeconds",
            fix: "0 or more",
        },
        Case {
            what: "an empty node id",
            json: r#"{"NodeRuntime": {"NodeId": " "}}"#,
            env: &[],
            key: "NodeRuntime.NodeId",
            fix: "non-empty",
        },
        Case {
            what: "a node id with a slash (a segment of the plane's URLs)",
            json: r#"{"NodeRuntime": {"NodeId": "eu/node-1"}}"#,
            env: &[],
            key: "NodeRuntime.NodeId",
            fix: "part of the control plane's URLs",
        },
        Case {
            what: "a node id with a space, from the environment",
            json: "{}",
            env: &[("NodeRuntime__NodeId", "node 1")],
            key: "NodeRuntime.NodeId",
            fix: "letters, digits",
        },
        Case {
            what: "a node id of two dots",
            json: r#"{"NodeRuntime": {"NodeId": ".."}}"#,
            env: &[],
            key: "NodeRuntime.NodeId",
            fix: "e.g. node-1",
        },
        Case {
            what: "a URL template without {version}",
            json: r#"{"AgentStore": {"HttpUrlTemplate": "{base}/agents/{agent_id}.wasm"}}"#,
            env: &[],
            key: "AgentStore.HttpUrlTemplate",
            fix: "with {agent_id} and {version}",
        },
        Case {
            what: "a URL template that is not http",
            json: r#"{"AgentStore": {"HttpUrlTemplate": "ftp://agents/{agent_id}/{version}.wasm"}}"#,
            env: &[],
            key: "AgentStore.HttpUrlTemplate",
            fix: "starting with http://",
        },
        Case {
            what: "an unknown agent source",
            json: r#"{"AgentStore": {"Sources": ["directory", "s3"]}}"#,
            env: &[],
            key: "AgentStore.Sources",
            fix: "each directory, http or oci",
        },
        Case {
            what: "the http source without a template",
            json: r#"{"AgentStore": {"Sources": "http"}}"#,
            env: &[],
            key: "AgentStore.Sources",
            fix: "AgentStore.HttpUrlTemplate is not set",
        },
        Case {
            what: "the oci source without a template",
            json: r#"{"AgentStore": {"Sources": ["oci"]}}"#,
            env: &[],
            key: "AgentStore.Sources",
            fix: "AgentStore.OciReferenceTemplate is not set",
        },
        Case {
            what: "an OCI template written as a URL",
            json: r#"{"AgentStore": {"OciReferenceTemplate": "https://registry.test/{agent_id}:{version}"}}"#,
            env: &[],
            key: "AgentStore.OciReferenceTemplate",
            fix: "REGISTRY/REPOSITORY:TAG",
        },
        Case {
            what: "a sampling ratio of 2",
            json: r#"{"OpenTelemetry": {"Traces": {"SamplingRatio": 2}}}"#,
            env: &[],
            key: "OpenTelemetry.Traces.SamplingRatio",
            fix: "from 0 to 1",
        },
        Case {
            what: "an unknown protocol",
            json: r#"{"OpenTelemetry": {"OtlpExporter": {"Protocol": "http/json"}}}"#,
            env: &[],
            key: "OpenTelemetry.OtlpExporter.Protocol",
            fix: "grpc or http/protobuf",
        },
        Case {
            what: "an unknown allocator",
            json: r#"{"Sandbox": {"Allocator": "mmap"}}"#,
            env: &[],
            key: "Sandbox.Allocator",
            fix: "auto, pooling or on-demand",
        },
        Case {
            what: "an unknown engine",
            json: r#"{"Sandbox": {"Engine": "winch"}}"#,
            env: &[],
            key: "Sandbox.Engine",
            fix: "cranelift (native code) or pulley",
        },
        Case {
            what: "an unknown engine from the environment",
            json: "{}",
            env: &[("Sandbox__Engine", "interpreter")],
            key: "Sandbox.Engine",
            fix: "cranelift (native code) or pulley",
        },
        Case {
            what: "a memory limit that is not a size",
            json: r#"{"Sandbox": {"MaxMemoryBytes": "lots"}}"#,
            env: &[],
            key: "Sandbox.MaxMemoryBytes",
            fix: "256MiB",
        },
        Case {
            what: "a memory limit below one page",
            json: r#"{"Sandbox": {"MaxMemoryBytes": 1024}}"#,
            env: &[],
            key: "Sandbox.MaxMemoryBytes",
            fix: "at least 64KiB",
        },
        Case {
            what: "an unknown log level",
            json: r#"{"Logging": {"LogLevel": {"Default": "Verbose"}}}"#,
            env: &[],
            key: "Logging.LogLevel.Default",
            fix: "Information",
        },
        Case {
            what: "a boolean where a number belongs",
            json: r#"{"NodeRuntime": {"MaxConcurrentLeases": true}}"#,
            env: &[],
            key: "NodeRuntime.MaxConcurrentLeases",
            fix: "whole number",
        },
        Case {
            what: "a section where a value belongs",
            json: r#"{"NodeRuntime": {"NodeId": {"Value": "n"}}}"#,
            env: &[],
            key: "NodeRuntime.NodeId",
            fix: "non-empty node id",
        },
        Case {
            what: "a value where a section belongs",
            json: r#"{"NodeRuntime": {"Capacity": 8}}"#,
            env: &[],
            key: "NodeRuntime.Capacity",
            fix: "a section",
        },
        Case {
            what: "a list where a boolean belongs",
            json: r#"{"MTls": {"Enabled": [true]}}"#,
            env: &[],
            key: "MTls.Enabled",
            fix: "true or false",
        },
        Case {
            what: "mTLS without a client certificate",
            json: r#"{"MTls": {"Enabled": true, "ClientKeyPath": "node.key"}}"#,
            env: &[],
            key: "MTls.ClientCertificatePath",
            fix: "set MTls.ClientCertificatePath",
        },
        Case {
            what: "mTLS, enabled from the environment, without a key",
            json: r#"{"MTls": {"ClientCertificatePath": "node.crt"}}"#,
            env: &[("MTLS__ENABLED", "true")],
            key: "MTls.ClientKeyPath",
            fix: "environment variable MTLS__ENABLED",
        },
        Case {
            what: "a CA certificate that does not exist, with mTLS on",
            json: r#"{"MTls": {"Enabled": true, "ClientCertificatePath": "node.crt",
                "ClientKeyPath": "node.key", "ServerCaCertificatePath": "certs/missing-ca.crt"}}"#,
            env: &[],
            key: "MTls.ServerCaCertificatePath",
            fix: "no such file",
        },
        Case {
            what: "a certificate path that is a directory, with mTLS on",
            json: r#"{"MTls": {"Enabled": true, "ClientCertificatePath": "."}}"#,
            env: &[],
            key: "MTls.ClientCertificatePath",
            fix: "is a directory",
        },
        Case {
            what: "an agents directory that is a file",
            json: r#"{"NodeRuntime": {"AgentsDirectory": "not-a-dir"}}"#,
            env: &[],
            key: "NodeRuntime.AgentsDirectory",
            fix: "not a directory",
        },
        Case {
            what: "a Foundry endpoint that is not a URL",
            json: r#"{"AgentRuntime": {"AzureAIFoundry": {"Endpoint": "foundry"}}}"#,
            env: &[],
            key: "AgentRuntime.AzureAIFoundry.Endpoint",
            fix: "http:// or https://",
        },
    ];
    for Case {
        what,
        json,
        env: vars,
        key,
        fix,
    } in cases
    {
        let err =
            NodeConfig::from_json_str(json, dir.path(), env(vars)).expect_err(&format!("{what}: must be refused"));
        let message = err.to_string();
        assert_eq!(err.key(), Some(key), "{what}: wrong key in `{message}`");
        assert!(message.starts_with(key), "{what}: `{message}` must start with the key");
        assert!(message.contains(fix), "{what}: `{message}` must say `{fix}`");
    }
}

#[test]
fn an_error_says_the_key_the_value_where_it_came_from_and_what_to_write() {
    let err = NodeConfig::from_json_str(
        r#"{"NodeRuntime": {"HeartbeatIntervalSeconds": -5}}"#,
        Path::new("/etc/node-runtime"),
        no_env(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "NodeRuntime.HeartbeatIntervalSeconds is -5 (in the configuration text): \
         expected a whole number of seconds greater than 0, e.g. 30"
    );

    let err = NodeConfig::load(
        &reference_file(),
        env(&[("NodeRuntime__ControlPlaneUrl", "ftp://control-plane")]),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "NodeRuntime.ControlPlaneUrl is \"ftp://control-plane\" \
         (from environment variable NodeRuntime__ControlPlaneUrl): expected an absolute \
         http:// or https:// URL with a host, e.g. https://control-plane:5109"
    );

    let err = NodeConfig::load(&reference_file(), env(&[("MTls__Enabled", "yes")])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "MTls.Enabled is \"yes\" (from environment variable MTls__Enabled): expected true or false"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("appsettings.json");
    std::fs::write(&path, r#"{"MTls": {"Enabled": true, "ClientCertificatePath": "x"}}"#).unwrap();
    let message = NodeConfig::load(&path, no_env()).unwrap_err().to_string();
    let resolved = dir.path().join("x");
    assert_eq!(
        message,
        format!(
            "MTls.ClientCertificatePath is \"x\" (resolved to {}) (in {}): no such file; \
             expected an existing PEM file (a relative path is resolved against the \
             configuration file's directory)",
            resolved.display(),
            std::path::absolute(&path).unwrap().display()
        )
    );
}

#[test]
fn invalid_json_is_reported_with_its_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("appsettings.json");
    std::fs::write(&path, "{\n  \"NodeRuntime\": {\n    \"NodeId\": node-1\n  }\n}\n").unwrap();
    let err = NodeConfig::load(&path, no_env()).unwrap_err();
    let ConfigError::Syntax { line, column, .. } = err else {
        panic!("expected a syntax error, got {err}");
    };
    // serde_json stops at the `o` of `node-1`, having read `n` as the
    // start of `null`.
    assert_eq!((line, column), (3, 16));
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.ends_with("at line 3, column 16"), "{message}");
}

#[test]
fn a_file_that_is_not_an_object_of_sections_is_refused() {
    let err = load(r#"["NodeRuntime"]"#).unwrap_err();
    assert!(matches!(err, ConfigError::NotAnObject { .. }), "{err}");
    assert!(err.to_string().contains("found a list"), "{err}");
}

#[test]
fn an_unreadable_file_is_reported_with_its_path() {
    let path = fixtures().join("no-such-appsettings.json");
    let err = NodeConfig::load(&path, no_env()).unwrap_err();
    assert!(matches!(err, ConfigError::Unreadable { .. }));
    assert!(
        err.to_string()
            .starts_with(&format!("cannot read the configuration file {}:", path.display())),
        "{err}"
    );
}

#[test]
fn comments_trailing_commas_and_a_byte_order_mark_are_read_as_dotnet_reads_them() {
    let config =
        load("\u{feff}{\n  // the node\n  \"NodeRuntime\": { /* id */ \"NodeId\": \"n\", \"Metadata\": {\"Region\": \"eu // not a comment\"}, },\n}\n")
            .unwrap();
    assert_eq!(config.node_runtime.node_id, "n");
    assert_eq!(config.node_runtime.metadata["Region"], "eu // not a comment");

    // Positions still point into the file as written: at the `1` where
    // a colon belongs.
    let line = "  /* a comment */ \"NodeRuntime\": {\"NodeId\" 1}";
    let err = load(&format!("{{\n{line}\n}}")).unwrap_err();
    let ConfigError::Syntax { line: 2, column, .. } = err else {
        panic!("expected a syntax error on line 2, got {err}");
    };
    assert_eq!(column, line.find('1').unwrap() + 1, "{err}");
}

#[test]
fn unknown_sections_and_keys_are_collected_for_one_warning() {
    let config = NodeConfig::from_json_str(
        r#"{"AllowedHosts": "*", "Kestrel": {"Endpoints": {}},
            "NodeRuntime": {"NodeId": "n", "Nodeid2": "x", "Capacity": {"Gpu": 1}},
            "Logging": {"LogLevel": {"Default": "Warning"}, "Console": {"FormatterName": "json"}}}"#,
        Path::new("/etc/node-runtime"),
        env(&[("Sandbox__MaxFuel", "1")]),
    )
    .unwrap();
    assert_eq!(
        config.ignored_keys,
        [
            "AllowedHosts",
            "Kestrel",
            "Logging.Console",
            "NodeRuntime.Capacity.Gpu",
            "NodeRuntime.Nodeid2",
            "Sandbox.MaxFuel",
        ]
    );
}

#[test]
fn log_levels_become_a_tracing_filter() {
    let config = load(
        r#"{"Logging": {"LogLevel": {"default": "Critical", "h2": "None", "tonic": "trace",
            "node_runtime::sandbox": "Debug", "bad target": "Debug", "Microsoft": 3}}}"#,
    )
    .unwrap();
    let filter = config.log_filter();
    assert_eq!(
        filter,
        "error,Microsoft=warn,h2=off,node_runtime::sandbox=debug,tonic=trace"
    );
    assert!(tracing_subscriber::EnvFilter::try_new(&filter).is_ok());
    assert_eq!(config.ignored_keys, ["Logging.LogLevel.bad target"]);
    assert_eq!(load("{}").unwrap().log_filter(), "info");
}

#[test]
fn config_check_output_redacts_the_api_key_and_loads_back() {
    let config = NodeConfig::load(
        &reference_file(),
        env(&[(
            "OpenTelemetry__OtlpExporter__Endpoint",
            "https://otel:s3cret-pw@collector:4318",
        )]),
    )
    .unwrap();
    let json = config.redacted_json();
    assert!(!json.contains("fixture-api-key-5c1e9b0d7a"), "{json}");
    assert!(!json.contains("s3cret-pw"), "{json}");

    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    let foundry = &value["AgentRuntime"]["AzureAIFoundry"];
    assert_eq!(foundry["ApiKey"], "***");
    assert_eq!(
        value["OpenTelemetry"]["OtlpExporter"]["Endpoint"],
        "https://***@collector:4318/"
    );
    // Certificate paths are not secrets.
    assert!(
        value["MTls"]["ClientKeyPath"]
            .as_str()
            .unwrap()
            .ends_with("certs/node.key")
    );
    // The reference's names and order, defaults filled in.
    let sections: Vec<&str> = json
        .lines()
        .filter_map(|line| line.strip_prefix("  \"")?.split_once('"').map(|(name, _)| name))
        .collect();
    assert_eq!(
        sections,
        [
            "NodeRuntime",
            "MTls",
            "AgentRuntime",
            "OpenTelemetry",
            "Logging",
            "Sandbox",
            "AgentStore",
            "DeclarativeAgents"
        ]
    );
    assert_eq!(value["NodeRuntime"]["HeartbeatIntervalSeconds"], 15);
    assert_eq!(value["NodeRuntime"]["Metadata"]["Region"], "eu-west-1");
    assert_eq!(value["Sandbox"]["Allocator"], "auto");
    assert_eq!(value["Sandbox"]["Engine"], "cranelift");
    assert_eq!(value["Logging"]["LogLevel"]["Microsoft.AspNetCore"], "Warning");

    // What `config check` prints is a configuration: it loads back the same,
    // but for the secrets it hid.
    let reloaded = NodeConfig::from_json_str(&json, Path::new("/"), no_env()).unwrap();
    let mut expected = config.clone();
    expected.agent_runtime.azure_ai_foundry.api_key = Some(Secret::new("***"));
    expected.open_telemetry.otlp_exporter.endpoint = Some("https://***@collector:4318/".parse().unwrap());
    expected.ignored_keys.clear();
    expected.sources = reloaded.sources.clone();
    assert_eq!(reloaded, expected);
}

#[test]
fn a_secret_never_shows_in_debug_output() {
    let config = NodeConfig::load(&reference_file(), no_env()).unwrap();
    assert!(!format!("{config:?}").contains("fixture-api-key"));
}

#[test]
fn an_empty_otlp_endpoint_turns_the_exporter_off_as_in_the_reference() {
    let config = load(r#"{"OpenTelemetry": {"OtlpExporter": {"Endpoint": ""}}}"#).unwrap();
    assert_eq!(config.open_telemetry.otlp_exporter.endpoint, None);
    let json = config.redacted_json();
    let reloaded = NodeConfig::from_json_str(&json, Path::new("/"), no_env()).unwrap();
    assert_eq!(reloaded.open_telemetry.otlp_exporter.endpoint, None);
}

#[test]
fn trusted_signing_keys_are_read_relative_to_the_configuration_file_and_a_bad_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (private, key) = crate::sandbox::signature::SigningKey::generate().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys").join("signer.pub"), key.to_pem()).unwrap();
    std::fs::write(dir.path().join("keys").join("signer.pem"), private).unwrap();
    let load_in = |json: &str| NodeConfig::from_json_str(json, dir.path(), no_env());

    let config = load_in(r#"{"AgentStore": {"TrustedSigningKeys": ["keys/signer.pub"]}}"#).unwrap();
    let trusted = &config.agent_store.trusted_signing_keys;
    assert_eq!(trusted.len(), 1);
    assert_eq!(trusted[0].key, key);
    assert_eq!(trusted[0].path, dir.path().join("keys").join("signer.pub"));

    let err = load_in(r#"{"AgentStore": {"TrustedSigningKeys": ["keys/signer.pub", "keys/signer.pem"]}}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("AgentStore.TrustedSigningKeys"), "{err}");
    assert!(err.contains("keys/signer.pem"), "{err}");
    assert!(err.contains("not a PEM public key"), "{err}");
    assert!(load("{}").unwrap().agent_store.trusted_signing_keys.is_empty());
}

#[test]
fn the_agent_store_tries_http_after_the_directory_once_a_template_is_set() {
    let config = load(
        r#"{"AgentStore": {"HttpUrlTemplate": "{base}/agents/{agent_id}/{version}.wasm",
        "RequireDigest": true, "MaxDownloadBytes": "8MiB", "DownloadTimeoutSeconds": 5}}"#,
    )
    .unwrap();
    let store = &config.agent_store;
    assert_eq!(store.sources, [AgentSourceKind::Directory, AgentSourceKind::Http]);
    assert!(store.require_digest);
    assert_eq!(store.max_download_bytes, 8 << 20);
    assert_eq!(store.download_timeout, Duration::from_secs(5));
    let config = load(
        r#"{"AgentStore": {"HttpUrlTemplate": "https://agents.test/{agent_id}/{version}",
        "Sources": "http, directory"}}"#,
    )
    .unwrap();
    assert_eq!(
        config.agent_store.sources,
        [AgentSourceKind::Http, AgentSourceKind::Directory]
    );
    assert_eq!(load("{}").unwrap().agent_store, AgentStoreSection::default());
}

#[test]
fn the_registry_password_is_read_from_the_environment_and_never_printed() {
    let config = NodeConfig::from_json_str(
        r#"{"AgentStore": {"OciReferenceTemplate": "127.0.0.1:5000/agents/{agent_id}:{version}",
            "OciUsername": "robot"}}"#,
        Path::new("."),
        env(&[("AgentStore__OciPassword", "hunter2-registry")]),
    )
    .unwrap();
    let store = &config.agent_store;
    assert_eq!(store.sources, [AgentSourceKind::Directory, AgentSourceKind::Oci]);
    assert_eq!(store.oci_password.as_ref().unwrap().expose(), "hunter2-registry");
    let printed = config.redacted_json();
    assert!(!printed.contains("hunter2-registry"), "{printed}");
    assert!(printed.contains(r#""OciPassword": "***""#), "{printed}");
    assert!(!format!("{config:?}").contains("hunter2-registry"));
}

#[test]
fn no_grant_overlaps_the_node_s_own_directories_or_files() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node");
    for sub in ["data/compiled", "agents", "tls", "shared"] {
        std::fs::create_dir_all(node.join(sub)).unwrap();
    }
    std::fs::write(node.join("tls/ca.pem"), "ca").unwrap();
    let config_file = dir.path().join("appsettings.json");
    let load = |host_path: &std::path::Path, read_only: bool| {
        let json = serde_json::json!({
            "NodeRuntime": {"DataDirectory": "node/data", "AgentsDirectory": "node/agents"},
            "MTls": {"ServerCaCertificatePath": "node/tls/ca.pem"},
            "Sandbox": {"Grants": {"echo": {"Directories": [
                {"HostPath": host_path, "GuestPath": "/d", "ReadOnly": read_only}
            ]}}}
        });
        std::fs::write(&config_file, json.to_string()).unwrap();
        // Relative paths resolve against the file's directory.
        NodeConfig::load(&config_file, no_env())
    };
    for read_only in [true, false] {
        for (granted, node_key) in [
            (node.join("data"), "NodeRuntime.DataDirectory"),
            (node.join("data/compiled"), "NodeRuntime.DataDirectory"),
            (node.clone(), "NodeRuntime.DataDirectory"),
            (node.join("agents"), "NodeRuntime.AgentsDirectory"),
            (node.join("tls"), "MTls.ServerCaCertificatePath"),
            (dir.path().to_path_buf(), "NodeRuntime.DataDirectory"),
        ] {
            let message = load(&granted, read_only).unwrap_err().to_string();
            for part in [
                "Sandbox.Grants.echo.Directories.0.HostPath",
                &granted.display().to_string(),
                node_key,
                "the node's own",
                "Grant a directory that neither contains nor lies inside",
            ] {
                assert!(message.contains(part), "{part} not in: {message}");
            }
        }
        // Beside them, the grant stands.
        let config = load(&node.join("shared"), read_only).unwrap();
        assert_eq!(
            config.sandbox.grants["echo"].directories[0].host_path,
            node.join("shared")
        );
    }
    // The configuration file's own directory.
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let json = serde_json::json!({
        "NodeRuntime": {"DataDirectory": node.join("data"), "AgentsDirectory": node.join("agents")},
        "Sandbox": {"Grants": {"echo": {"Directories": [{"HostPath": etc, "GuestPath": "/d"}]}}}
    });
    std::fs::write(etc.join("appsettings.json"), json.to_string()).unwrap();
    let message = NodeConfig::load(&etc.join("appsettings.json"), no_env())
        .unwrap_err()
        .to_string();
    assert!(message.contains("the configuration file"), "{message}");
}

#[test]
fn a_bad_grant_names_its_key_its_value_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "x").unwrap();
    std::fs::create_dir(dir.path().join("ref")).unwrap();
    let refused = |grant: &str| {
        let json = format!(r#"{{"Sandbox": {{"Grants": {{"echo": {grant}}}}}}}"#);
        NodeConfig::from_json_str(&json, dir.path(), no_env())
            .unwrap_err()
            .to_string()
    };
    let cases = [
        (
            r#"{"Directories": [{"HostPath": "missing", "GuestPath": "/data"}]}"#,
            "Sandbox.Grants.echo.Directories.0.HostPath",
            "no such directory",
        ),
        (
            r#"{"Directories": [{"HostPath": "file", "GuestPath": "/data"}]}"#,
            "Sandbox.Grants.echo.Directories.0.HostPath",
            "not a directory",
        ),
        (
            r#"{"Directories": [{"GuestPath": "/data"}]}"#,
            "Sandbox.Grants.echo.Directories.0.HostPath",
            "host directory to grant",
        ),
        (
            r#"{"Directories": [{"HostPath": "ref", "GuestPath": "data/../x"}]}"#,
            "Sandbox.Grants.echo.Directories.0.GuestPath",
            "absolute path",
        ),
        (
            r#"{"Directories": [{"HostPath": "ref", "GuestPath": "/d"}, {"HostPath": "ref", "GuestPath": "/d/"}]}"#,
            "Sandbox.Grants.echo.Directories.1.GuestPath",
            "already granted",
        ),
        (
            r#"{"Directories": [{"HostPath": "ref", "GuestPath": "/d", "ReadOnly": "sometimes"}]}"#,
            "Sandbox.Grants.echo.Directories.0.ReadOnly",
            "true or false",
        ),
        (
            r#"{"Directories": "ref"}"#,
            "Sandbox.Grants.echo.Directories",
            "a list of directories",
        ),
        (
            r#"{"Environment": ["TOKEN=abc"]}"#,
            "Sandbox.Grants.echo.Environment",
            "the name only",
        ),
        (
            r#"{"AllowedHosts": ["https://x.com/"]}"#,
            "Sandbox.Grants.echo.AllowedHosts",
            "host:port",
        ),
    ];
    for (grant, key, fix) in cases {
        let message = refused(grant);
        assert!(message.contains(key), "{grant}: {message}");
        assert!(message.contains(fix), "{grant}: {message}");
        assert!(message.contains("in the configuration text"), "{grant}: {message}");
    }
    let missing = refused(r#"{"Directories": [{"HostPath": "missing", "GuestPath": "/data"}]}"#);
    std::fs::create_dir(dir.path().join("ref").join("inner")).unwrap();
    let nested = NodeConfig::from_json_str(
        r#"{"Sandbox": {"Grants": {
            "echo": {"Directories": [{"HostPath": "ref", "GuestPath": "/out", "ReadOnly": false}]},
            "other": {"Directories": [{"HostPath": "ref/inner", "GuestPath": "/in"}]}}}}"#,
        dir.path(),
        no_env(),
    )
    .unwrap_err()
    .to_string();
    for part in [
        "Sandbox.Grants.other.Directories.0.HostPath",
        "agent `echo`",
        "inside",
        "read-only",
    ] {
        assert!(nested.contains(part), "{part} not in {nested}");
    }
    assert!(
        missing.contains(&dir.path().join("missing").display().to_string()),
        "{missing}"
    );
}

#[test]
fn no_grant_passes_the_llm_key_or_a_node_setting_to_an_agent() {
    let with_key = |grant: &str| {
        let json = format!(
            r#"{{"AgentRuntime": {{"OpenAI": {{"Endpoint": "http://127.0.0.1:8000",
                  "ApiKeyEnvironmentVariable": "LLM_KEY"}}}},
                "Sandbox": {{"Grants": {{"echo": {{"Environment": {grant}}}}}}}}}"#
        );
        NodeConfig::from_json_str(&json, Path::new("/etc/node-runtime"), env(&[("LLM_KEY", "sk-1")]))
    };
    for grant in [
        r#"["LLM_KEY"]"#,
        r#""TENANT, AgentRuntime__OpenAI__ApiKey""#,
        r#"["sandbox:grants"]"#,
    ] {
        let message = with_key(grant).unwrap_err().to_string();
        assert!(message.contains("Sandbox.Grants.echo.Environment"), "{message}");
        assert!(message.contains("never given"), "{message}");
        assert!(!message.contains("sk-1"), "{message}");
    }
    assert!(with_key(r#"["TENANT", "NodeRuntimeish"]"#).is_ok());
}

/// The reference node's own `appsettings.json`, as it ships.
#[test]
fn the_reference_nodes_own_appsettings_loads_with_mtls_off_and_its_certificates_unread() {
    // Its certificates live under /etc/bpa/certs, which exists only where
    // they are mounted.
    assert!(!Path::new("/etc/bpa/certs/node-cert.pem").exists());
    let config = NodeConfig::load(&reference_node_file(), no_env()).unwrap();

    assert!(!config.mtls.enabled);
    assert_eq!(
        config.mtls.client_certificate_path.as_deref(),
        Some(Path::new("/etc/bpa/certs/node-cert.pem"))
    );
    assert_eq!(
        config.mtls.server_ca_certificate_path.as_deref(),
        Some(Path::new("/etc/bpa/certs/ca-cert.pem"))
    );
    assert_eq!(config.node_runtime.node_id, "node-1");
    assert_eq!(config.node_runtime.control_plane_url, "http://localhost:5109");
    assert_eq!(config.node_runtime.metadata["Region"], "us-east-1");
    assert_eq!(config.agent_runtime.default_model, "gpt-4");
    assert_eq!(config.ignored_keys, ["AllowedHosts"]);

    // Foundry with empty strings and managed identity: not configured, not
    // an error; `llm.chat` answers not-configured.
    let foundry = &config.agent_runtime.azure_ai_foundry;
    assert_eq!(foundry.endpoint, None);
    assert_eq!(foundry.deployment_name, None);
    assert!(foundry.api_key.is_none());
    assert!(foundry.use_managed_identity);

    // The environment's file is looked for, and is optional.
    assert_eq!(config.sources.environment.name, "Production");
    assert_eq!(config.sources.files.len(), 1);
    assert_eq!(
        config.sources.environment_file.as_deref().and_then(Path::file_name),
        Some(std::ffi::OsStr::new("reference-appsettings.Production.json"))
    );
}

fn reference_node_file() -> PathBuf {
    fixtures().join("reference-appsettings.json")
}

/// `files` (name, text) written into a fresh directory.
fn config_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(fixtures().join(name)).unwrap()
}

/// The reference's file as `appsettings.json`, its Development overlay
/// beside it as `appsettings.Development.json`.
fn reference_with_overlay() -> tempfile::TempDir {
    config_dir(&[
        ("appsettings.json", &fixture_text("reference-appsettings.json")),
        (
            "appsettings.Development.json",
            &fixture_text("reference-appsettings.Development.json"),
        ),
    ])
}

#[test]
fn with_mtls_enabled_the_reference_nodes_missing_certificates_stop_start_up() {
    let err = NodeConfig::load(&reference_node_file(), env(&[("MTls__Enabled", "true")])).unwrap_err();
    assert_eq!(err.key(), Some("MTls.ClientCertificatePath"), "{err}");
    let message = err.to_string();
    assert!(message.contains("/etc/bpa/certs/node-cert.pem"), "{message}");
    assert!(message.contains("no such file"), "{message}");
}

#[test]
fn the_environments_file_is_merged_over_the_base_key_by_key() {
    let dir = reference_with_overlay();
    let base = dir.path().join("appsettings.json");
    let config = NodeConfig::load(&base, env(&[("DOTNET_ENVIRONMENT", "Development")])).unwrap();

    // The overlay's keys win...
    assert_eq!(config.node_runtime.node_id, "node-dev");
    assert_eq!(config.node_runtime.capacity.slots, 2);
    assert!(config.log_filter().starts_with("debug,"), "{}", config.log_filter());
    // ...and the base's other keys remain, in the sections both name too.
    assert_eq!(config.node_runtime.capacity.cpu, "4");
    assert_eq!(config.node_runtime.capacity.memory, "8Gi");
    assert_eq!(config.node_runtime.control_plane_url, "http://localhost:5109");
    assert_eq!(config.node_runtime.max_concurrent_leases, 5);
    assert_eq!(config.node_runtime.metadata["Region"], "us-east-1");
    assert_eq!(config.logging.log_level["Microsoft.AspNetCore"], LogLevel::Warning);
    assert!(!config.mtls.enabled);
    assert_eq!(
        config.sources.files,
        [
            std::path::absolute(&base).unwrap(),
            std::path::absolute(dir.path().join("appsettings.Development.json")).unwrap(),
        ]
    );

    // Production (no variable) has no file: the overlay is not read.
    let config = NodeConfig::load(&base, no_env()).unwrap();
    assert_eq!(config.node_runtime.node_id, "node-1");
    assert_eq!(config.node_runtime.capacity.slots, 8);
    assert_eq!(config.sources.files.len(), 1);
}

#[test]
fn environment_variables_override_both_files() {
    let dir = reference_with_overlay();
    let config = NodeConfig::load(
        &dir.path().join("appsettings.json"),
        env(&[
            ("DOTNET_ENVIRONMENT", "Development"),
            ("NodeRuntime__NodeId", "node-env"),
            ("NodeRuntime__Capacity__Memory", "1Gi"),
        ]),
    )
    .unwrap();
    assert_eq!(config.node_runtime.node_id, "node-env");
    assert_eq!(config.node_runtime.capacity.memory, "1Gi");
    assert_eq!(config.node_runtime.capacity.slots, 2, "the overlay's");
    assert_eq!(config.node_runtime.capacity.cpu, "4", "the base's");
}

#[test]
fn dotnet_environment_wins_over_aspnetcore_environment_and_production_is_the_default() {
    let named = |pairs: &[(&str, &str)]| HostingEnvironment::from_env(&env(pairs));
    assert_eq!(named(&[]), HostingEnvironment::default());
    assert_eq!(named(&[]).name, "Production");

    let aspnet = named(&[("ASPNETCORE_ENVIRONMENT", "Staging")]);
    assert_eq!(aspnet.name, "Staging");
    assert_eq!(aspnet.variable.as_deref(), Some("ASPNETCORE_ENVIRONMENT"));

    // Both set: DOTNET_, as the reference's generic host and .NET 7+
    // web hosts read it; the loser is reported.
    let both = named(&[
        ("ASPNETCORE_ENVIRONMENT", "Staging"),
        ("DOTNET_ENVIRONMENT", "Development"),
    ]);
    assert_eq!(both.name, "Development");
    assert_eq!(both.variable.as_deref(), Some("DOTNET_ENVIRONMENT"));
    assert_eq!(both.overridden.as_deref(), Some("ASPNETCORE_ENVIRONMENT=Staging"));

    // Empty is unset; names match in any case, as .NET matches them.
    let empty = named(&[("DOTNET_ENVIRONMENT", ""), ("ASPNETCORE_ENVIRONMENT", "Staging")]);
    assert_eq!(empty.name, "Staging");
    assert_eq!(named(&[("dotnet_environment", "Development")]).name, "Development");

    // Through `load`: the Development file is layered for either variable.
    let dir = reference_with_overlay();
    let base = dir.path().join("appsettings.json");
    let id = |pairs: &[(&str, &str)]| NodeConfig::load(&base, env(pairs)).unwrap().node_runtime.node_id;
    assert_eq!(id(&[("ASPNETCORE_ENVIRONMENT", "Development")]), "node-dev");
    assert_eq!(
        id(&[
            ("DOTNET_ENVIRONMENT", "Production"),
            ("ASPNETCORE_ENVIRONMENT", "Development")
        ]),
        "node-1"
    );
    // The name is a file name: on Linux its case matters, as in .NET.
    assert_eq!(id(&[("DOTNET_ENVIRONMENT", "development")]), "node-1");
}

#[test]
fn a_bad_environments_file_is_named_in_the_error() {
    let base = fixture_text("reference-appsettings.json");
    let dotnet_env = env(&[("DOTNET_ENVIRONMENT", "Development")]);

    let dir = config_dir(&[
        ("appsettings.json", &base),
        ("appsettings.Development.json", "{\n  \"NodeRuntime\": {\n"),
    ]);
    let overlay = std::path::absolute(dir.path().join("appsettings.Development.json")).unwrap();
    let err = NodeConfig::load(&dir.path().join("appsettings.json"), dotnet_env.clone()).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { line: 3, .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("{} is not valid JSON", overlay.display())),
        "{err}"
    );

    std::fs::write(&overlay, "[]").unwrap();
    let err = NodeConfig::load(&dir.path().join("appsettings.json"), dotnet_env.clone()).unwrap_err();
    assert!(
        matches!(err, ConfigError::NotAnObject { ref file, .. } if *file == overlay.display().to_string()),
        "{err}"
    );

    // A bad value says which file it is in; a good one in the base does not
    // change that.
    std::fs::write(&overlay, r#"{"NodeRuntime": {"Capacity": {"Slots": 0}}}"#).unwrap();
    let err = NodeConfig::load(&dir.path().join("appsettings.json"), dotnet_env.clone()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "NodeRuntime.Capacity.Slots is 0 (in {}): expected a whole number of at least 1 \
             (runs the node takes at once), e.g. 8",
            overlay.display()
        )
    );

    // An environment's file that exists but cannot be read is an error too.
    std::fs::remove_file(&overlay).unwrap();
    std::fs::create_dir(&overlay).unwrap();
    let err = NodeConfig::load(&dir.path().join("appsettings.json"), dotnet_env).unwrap_err();
    assert!(
        matches!(err, ConfigError::Unreadable { ref path, .. } if *path == overlay),
        "{err}"
    );
}

#[test]
fn mtls_enabled_in_the_environments_file_needs_certificates_set_in_either_file() {
    let dir = config_dir(&[
        ("appsettings.json", r#"{"MTls": {"Enabled": false}}"#),
        ("appsettings.Staging.json", r#"{"MTls": {"Enabled": true}}"#),
    ]);
    let path = std::path::absolute(dir.path().join("appsettings.json")).unwrap();
    let err = NodeConfig::load(&path, env(&[("DOTNET_ENVIRONMENT", "Staging")])).unwrap_err();
    assert_eq!(err.key(), Some("MTls.ClientCertificatePath"));
    assert!(
        err.to_string().contains(&format!(
            "is not set (in neither {} nor {})",
            path.display(),
            dir.path().join("appsettings.Staging.json").display()
        )),
        "{err}"
    );
}

#[test]
fn arrays_merge_by_index_as_in_dotnet_and_a_string_replaces_a_whole_list() {
    let base = r#"{"Sandbox": {"AllowedHosts": {"echo": ["a.test", "b.test", "c.test"]}}}"#;
    let hosts = |overlay: &str, pairs: &[(&str, &str)]| {
        let dir = config_dir(&[("appsettings.json", base), ("appsettings.Development.json", overlay)]);
        let mut vars = env(pairs);
        vars.push(("DOTNET_ENVIRONMENT".into(), "Development".into()));
        NodeConfig::load(&dir.path().join("appsettings.json"), vars)
            .unwrap()
            .sandbox
            .allowed_hosts["echo"]
            .clone()
    };
    // .NET flattens an array to keys `0`, `1`, ...: a shorter array in the
    // environment's file replaces only the first entries.
    assert_eq!(
        hosts(r#"{"Sandbox": {"AllowedHosts": {"echo": ["x.test"]}}}"#, &[]),
        ["x.test", "b.test", "c.test"]
    );
    // An empty array has no keys, so it replaces nothing.
    assert_eq!(
        hosts(r#"{"Sandbox": {"AllowedHosts": {"echo": []}}}"#, &[]),
        ["a.test", "b.test", "c.test"]
    );
    // A string (where the key takes a comma-separated one) replaces it all.
    assert_eq!(
        hosts(r#"{"Sandbox": {"AllowedHosts": {"echo": "x.test"}}}"#, &[]),
        ["x.test"]
    );
    // An environment variable with an index replaces that entry only.
    assert_eq!(
        hosts("{}", &[("Sandbox__AllowedHosts__echo__1", "y.test")]),
        ["a.test", "y.test", "c.test"]
    );
}

#[test]
fn keys_in_the_environments_file_match_the_base_in_any_case() {
    let dir = config_dir(&[
        ("appsettings.json", &fixture_text("reference-appsettings.json")),
        (
            "appsettings.Development.json",
            r#"{"noderuntime": {"CAPACITY": {"slots": 3}}}"#,
        ),
    ]);
    let config = NodeConfig::load(
        &dir.path().join("appsettings.json"),
        env(&[("DOTNET_ENVIRONMENT", "Development")]),
    )
    .unwrap();
    assert_eq!(config.node_runtime.capacity.slots, 3);
    assert_eq!(config.node_runtime.capacity.cpu, "4");
    assert_eq!(config.node_runtime.node_id, "node-1");
    assert_eq!(config.ignored_keys, ["AllowedHosts"]);
}

#[test]
fn a_file_named_otherwise_is_layered_with_the_environment_before_its_extension() {
    let staging = HostingEnvironment {
        name: "Staging".to_string(),
        ..HostingEnvironment::default()
    };
    assert_eq!(
        staging.file_for(Path::new("/etc/node/appsettings.json")),
        Path::new("/etc/node/appsettings.Staging.json")
    );
    assert_eq!(
        staging.file_for(Path::new("/etc/node/node.json")),
        Path::new("/etc/node/node.Staging.json")
    );
    assert_eq!(
        staging.file_for(Path::new("/etc/node/node")),
        Path::new("/etc/node/node.Staging")
    );

    let dir = config_dir(&[
        ("node.json", r#"{"NodeRuntime": {"NodeId": "base"}}"#),
        ("node.Staging.json", r#"{"NodeRuntime": {"NodeId": "staging"}}"#),
    ]);
    let config = NodeConfig::load(
        &dir.path().join("node.json"),
        env(&[("ASPNETCORE_ENVIRONMENT", "Staging")]),
    )
    .unwrap();
    assert_eq!(config.node_runtime.node_id, "staging");
}

#[test]
fn the_sources_line_says_which_environment_and_which_files() {
    let dir = reference_with_overlay();
    let base = dir.path().join("appsettings.json");
    let config = NodeConfig::load(
        &base,
        env(&[
            ("DOTNET_ENVIRONMENT", "Development"),
            ("ASPNETCORE_ENVIRONMENT", "Staging"),
        ]),
    )
    .unwrap();
    let line = config.sources.to_string();
    assert!(
        line.starts_with(
            "environment Development (from DOTNET_ENVIRONMENT, which wins over \
             ASPNETCORE_ENVIRONMENT=Staging); read "
        ),
        "{line}"
    );
    assert!(line.contains("appsettings.Development.json over it"), "{line}");

    let line = NodeConfig::load(&base, no_env()).unwrap().sources.to_string();
    assert!(
        line.contains("the default: neither DOTNET_ENVIRONMENT nor ASPNETCORE_ENVIRONMENT is set"),
        "{line}"
    );
    assert!(
        line.contains("no ") && line.contains("appsettings.Production.json beside it"),
        "{line}"
    );
}

#[test]
fn allowed_models_are_a_list_or_a_comma_separated_string_and_are_printed() {
    let config = load(r#"{"AgentRuntime": {"AllowedModels": ["gpt-4o-mini", " gpt-4o "]}}"#).unwrap();
    let allowed: Vec<&str> = config.agent_runtime.allowed_models.iter().map(String::as_str).collect();
    assert_eq!(allowed, ["gpt-4o", "gpt-4o-mini"]);
    assert!(
        config.redacted_json().contains(r#""AllowedModels": ["#),
        "{}",
        config.redacted_json()
    );
    let from_env =
        NodeConfig::from_json_str("{}", Path::new("."), env(&[("AgentRuntime__AllowedModels", "a,b")])).unwrap();
    assert_eq!(from_env.agent_runtime.allowed_models.len(), 2);
    assert!(
        load("{}").unwrap().agent_runtime.allowed_models.is_empty(),
        "empty: any model"
    );
}

#[test]
fn the_compile_limits_bind_and_a_bad_one_is_refused_naming_its_key() {
    let config = load(
        r#"{"Sandbox": {"MaxComponentBytes": "32MiB", "MaxFunctions": 5000,
            "MaxFunctionBytes": "1MiB", "MaxNesting": 100, "MaxFunctionLocals": 300,
            "MaxLocals": 90000}}"#,
    )
    .unwrap();
    let limits = config.sandbox.compile_limits;
    assert_eq!(
        (
            limits.max_bytes,
            limits.max_functions,
            limits.max_function_bytes,
            limits.max_nesting,
            limits.max_function_locals,
            limits.max_locals
        ),
        (32 << 20, 5000, 1 << 20, 100, 300, 90000)
    );
    let printed = config.redacted_json();
    assert!(printed.contains(r#""MaxNesting": 100"#), "{printed}");
    assert!(printed.contains(r#""MaxFunctionLocals": 300"#), "{printed}");
    assert!(printed.contains(r#""MaxLocals": 90000"#), "{printed}");
    assert_eq!(
        load("{}").unwrap().sandbox.compile_limits,
        crate::sandbox::CompileLimits::default()
    );
    for (json, key) in [
        (r#"{"Sandbox": {"MaxFunctions": 0}}"#, "Sandbox.MaxFunctions"),
        (r#"{"Sandbox": {"MaxNesting": -1}}"#, "Sandbox.MaxNesting"),
        (r#"{"Sandbox": {"MaxFunctionLocals": 0}}"#, "Sandbox.MaxFunctionLocals"),
        (r#"{"Sandbox": {"MaxLocals": "many"}}"#, "Sandbox.MaxLocals"),
        (
            r#"{"Sandbox": {"MaxComponentBytes": "lots"}}"#,
            "Sandbox.MaxComponentBytes",
        ),
    ] {
        let err = load(json).unwrap_err().to_string();
        assert!(err.contains(key), "{json}: {err}");
    }
}

#[test]
fn the_download_cache_bound_holds_at_least_one_download_of_the_largest_size() {
    let config = load(r#"{"AgentStore": {"DownloadCacheMaxBytes": "512MiB"}}"#).unwrap();
    assert_eq!(config.agent_store.download_cache_max_bytes, 512 << 20);
    assert!(config.redacted_json().contains(r#""DownloadCacheMaxBytes": 536870912"#));
    let raised = load(r#"{"AgentStore": {"MaxDownloadBytes": "2GiB"}}"#).unwrap();
    assert_eq!(
        raised.agent_store.download_cache_max_bytes,
        2 << 30,
        "the default follows"
    );
    let err = load(r#"{"AgentStore": {"MaxDownloadBytes": "64MiB", "DownloadCacheMaxBytes": "32MiB"}}"#)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("AgentStore.DownloadCacheMaxBytes") && err.contains("at least AgentStore.MaxDownloadBytes"),
        "{err}"
    );
}

/// Loading once took time quadratic in the number of keys (10,000 keys
/// 2.4 s, 40,000 keys 43 s, in a release build): each key was found by a
/// linear search of its section. 40,000 keys, half of them a map the node
/// reads key by key and half unknown keys it lists, load with every key
/// accounted for, and keys that differ only in case still merge.
#[test]
fn a_configuration_of_forty_thousand_keys_loads_with_every_key_accounted_for() {
    const HALF: usize = 20_000;
    let metadata: serde_json::Map<String, serde_json::Value> = (0..HALF)
        .map(|i| (format!("Key{i}"), serde_json::Value::from(format!("value-{i}"))))
        .collect();
    let unknown: serde_json::Map<String, serde_json::Value> = (0..HALF)
        .map(|i| (format!("Unknown{i}"), serde_json::Value::from(i)))
        .collect();
    let mut node_runtime = unknown;
    node_runtime.insert("Metadata".to_string(), serde_json::Value::Object(metadata));
    let json = serde_json::json!({ "NodeRuntime": node_runtime }).to_string();
    // An earlier key spelt in another case keeps its spelling and takes
    // the later value.
    let json = json.replacen('{', r#"{"nodeRuntime": {"metadata": {"KEY7": "first"}}, "#, 1);

    let config = load(&json).unwrap();
    let metadata = &config.node_runtime.metadata;
    assert_eq!(metadata.len(), HALF);
    assert_eq!(metadata["KEY7"], "value-7");
    assert!(!metadata.contains_key("Key7"));
    assert_eq!(metadata[&format!("Key{}", HALF - 1)], format!("value-{}", HALF - 1));
    assert_eq!(config.ignored_keys.len(), HALF);
    assert!(
        config
            .ignored_keys
            .contains(&format!("NodeRuntime.Unknown{}", HALF - 1))
    );
}

#[test]
fn declarative_agents_secrets_are_bound_to_hosts_read_from_the_environment_and_never_printed() {
    let json = r#"{"DeclarativeAgents": {"AllowedHosts": "erp.example.com, 127.0.0.1:9000",
        "Secrets": {"ERP_TOKEN": {"EnvironmentVariable": "ERP_TOKEN_VAR", "Hosts": ["erp.example.com"]},
                    "INLINE": {"Value": "inline-s3cret", "Hosts": "hooks.example.com"}}}}"#;
    let config = NodeConfig::from_json_str(
        json,
        Path::new("/etc/node-runtime"),
        env(&[("ERP_TOKEN_VAR", "env-s3cret")]),
    )
    .unwrap();
    let section = &config.declarative_agents;
    assert!(section.enabled);
    assert_eq!(section.allowed_hosts, ["erp.example.com", "127.0.0.1:9000"]);
    let erp = &section.secrets["ERP_TOKEN"];
    assert_eq!(erp.value.expose(), "env-s3cret");
    assert_eq!(erp.hosts, ["erp.example.com"]);
    assert_eq!(section.secrets["INLINE"].value.expose(), "inline-s3cret");
    let printed = config.redacted_json();
    assert!(!printed.contains("s3cret"), "{printed}");
    assert!(printed.contains("ERP_TOKEN_VAR"), "{printed}");

    for (bad, says) in [
        (
            r#"{"Secrets": {"A": {"Value": "v"}}}"#,
            "DeclarativeAgents.Secrets.A.Hosts",
        ),
        (
            r#"{"Secrets": {"A": {"Hosts": ["h"]}}}"#,
            "DeclarativeAgents.Secrets.A.Value",
        ),
        (
            r#"{"Secrets": {"A": {"EnvironmentVariable": "UNSET_VAR_X", "Hosts": ["h"]}}}"#,
            "UNSET_VAR_X is not set",
        ),
        (
            r#"{"Secrets": {"A-B": {"Value": "v", "Hosts": ["h"]}}}"#,
            "letters, digits",
        ),
        (
            r#"{"AllowedHosts": ["https://x.com"]}"#,
            "DeclarativeAgents.AllowedHosts",
        ),
    ] {
        let json = format!(r#"{{"DeclarativeAgents": {bad}}}"#);
        let message = load(&json).unwrap_err().to_string();
        assert!(message.contains(says), "{bad}: {message}");
        assert!(!message.contains("s3cret"), "{bad}: {message}");
    }
    // Nor from the environment.
    let message = NodeConfig::from_json_str(
        "{}",
        Path::new("/etc/node-runtime"),
        env(&[("DeclarativeAgents__Secrets__T", "env-s3cret")]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        message.contains("DeclarativeAgents.Secrets.T") && !message.contains("s3cret"),
        "{message}"
    );
    // No grant hands a secret's variable to an agent.
    let json = r#"{"DeclarativeAgents": {"Secrets": {"T": {"EnvironmentVariable": "ERP_TOKEN_VAR", "Hosts": ["h"]}}},
                   "Sandbox": {"Grants": {"echo": {"Environment": ["ERP_TOKEN_VAR"]}}}}"#;
    let message = NodeConfig::from_json_str(json, Path::new("/etc/node-runtime"), env(&[("ERP_TOKEN_VAR", "x")]))
        .unwrap_err()
        .to_string();
    assert!(message.contains("never given"), "{message}");
}

#[test]
fn the_agents_directory_may_not_lie_in_the_download_cache() {
    let dir = tempfile::tempdir().unwrap();
    let inside = dir.path().join("data/agents/http");
    std::fs::create_dir_all(&inside).unwrap();
    let json =
        serde_json::json!({"NodeRuntime": {"DataDirectory": dir.path().join("data"), "AgentsDirectory": inside}});
    let message = NodeConfig::from_json_str(&json.to_string(), dir.path(), no_env())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("NodeRuntime.AgentsDirectory") && message.contains("download cache"),
        "{message}"
    );
}
