//! The configuration as running parts: the sandbox each configuration
//! asks for, specified by example from the file or the environment.

use std::path::Path;
use std::time::Duration;

use super::{outbox_limits, sandbox_config};
use crate::config::tests::{env, fixtures, load, no_env};
use crate::config::*;
use crate::sandbox::*;

#[test]
fn the_sandbox_section_sets_the_node_limits_and_the_pool() {
    let config = NodeConfig::load(&fixtures().join("appsettings.node.json"), no_env()).unwrap();
    assert!(config.mtls.enabled);
    assert_eq!(config.slots(), 2, "the lower of MaxConcurrentLeases 2 and Slots 4");
    let sandbox = sandbox_config(&config);
    assert_eq!(
        sandbox.limits,
        NodeLimits {
            fuel: 2_000_000_000,
            memory_bytes: 128 << 20,
            table_elements: 20_000,
            duration: Duration::from_secs(30),
            tokens: 2000,
            result_bytes: 256 << 10,
            log_lines: 500,
            log_bytes: 262_144,
            ..NodeLimits::default()
        }
    );
    assert_eq!(sandbox.engine.allocator, AllocatorChoice::OnDemand);
    assert_eq!(sandbox.engine.max_concurrent_runs, 2);
    assert_eq!(config.node_runtime.data_directory, Path::new("/var/lib/node-runtime"));
    assert_eq!(config.log_filter(), "warn,node_runtime=info");
    assert!(config.ignored_keys.is_empty(), "{:?}", config.ignored_keys);
}

#[test]
fn the_pulley_engine_is_chosen_in_the_file_or_the_environment() {
    let from_file = load(r#"{"Sandbox": {"Engine": "Pulley"}}"#).unwrap();
    assert_eq!(sandbox_config(&from_file).engine.execution, Execution::Pulley);
    let from_env = NodeConfig::from_json_str(
        r#"{"Sandbox": {"Engine": "cranelift"}}"#,
        Path::new("/"),
        env(&[("Sandbox__Engine", "pulley")]),
    )
    .unwrap();
    assert_eq!(sandbox_config(&from_env).engine.execution, Execution::Pulley);
}

#[test]
fn sizes_take_kubernetes_and_binary_units_and_the_slots_follow_capacity() {
    let config = load(
        r#"{"NodeRuntime": {"MaxConcurrentLeases": 10, "Capacity": {"Slots": 3}},
            "Sandbox": {"MaxMemoryBytes": "256Mi", "MaxResultBytes": 4096, "Allocator": "Pooling"}}"#,
    )
    .unwrap();
    assert_eq!(config.sandbox.max_memory_bytes, 256 << 20);
    assert_eq!(config.sandbox.max_result_bytes, 4096);
    assert_eq!(config.slots(), 3);
    let sandbox = sandbox_config(&config);
    assert_eq!(sandbox.engine.max_concurrent_runs, 3);
    assert_eq!(sandbox.engine.allocator, AllocatorChoice::Pooling);
    assert_eq!(sandbox.engine.execution, Execution::Cranelift, "the default");
    assert_eq!(sandbox_config(&NodeConfig::default()).limits, NodeLimits::default());
}

#[test]
fn the_outbox_gathers_commits_on_a_node_of_sixteen_slots_or_more() {
    let gathers = |json: &str| outbox_limits(&load(json).unwrap()).gather;
    assert!(!gathers("{}"), "the default 5 slots");
    assert!(!gathers(
        r#"{"NodeRuntime": {"MaxConcurrentLeases": 15, "Capacity": {"Slots": 15}}}"#
    ));
    assert!(gathers(
        r#"{"NodeRuntime": {"MaxConcurrentLeases": 16, "Capacity": {"Slots": 16}}}"#
    ));
    assert!(gathers(
        r#"{"NodeRuntime": {"MaxConcurrentLeases": 64, "Capacity": {"Slots": 64}}}"#
    ));
    assert!(
        !gathers(r#"{"NodeRuntime": {"MaxConcurrentLeases": 8, "Capacity": {"Slots": 64}}}"#),
        "the slots a node runs at once: the lower of the two"
    );
    let limits = outbox_limits(&load(r#"{"NodeRuntime": {"Capacity": {"Slots": 64}}}"#).unwrap());
    let default = crate::outbox::OutboxLimits::default();
    assert_eq!((limits.max_reports, limits.grace), (default.max_reports, default.grace));
}

#[test]
fn azure_ai_foundry_becomes_the_sandbox_llm_provider() {
    assert!(sandbox_config(&NodeConfig::default()).llm.is_none());
    let config = load(
        r#"{"AgentRuntime": {"DefaultModel": "gpt-4o-mini", "DefaultTemperature": 0.2,
            "AzureAIFoundry": {"Endpoint": "https://acme.openai.azure.com",
                               "DeploymentName": "chat", "ApiKey": "azure-secret"}}}"#,
    )
    .unwrap();
    let llm = sandbox_config(&config).llm.expect("an LLM provider");
    assert_eq!(
        llm.endpoint.url(),
        "https://acme.openai.azure.com/openai/deployments/chat/chat/completions?api-version=2024-06-01"
    );
    assert_eq!(llm.default_model, "gpt-4o-mini");
    assert_eq!(llm.default_temperature, 0.2);
    assert_eq!(llm.api_key.expose(), "azure-secret");
    assert!(!format!("{llm:?}").contains("azure-secret"));
}

#[test]
fn an_openai_endpoint_takes_its_key_from_the_named_variable_and_its_prices() {
    let json = r#"{"AgentRuntime": {
        "DefaultModel": "stub-model",
        "OpenAI": {"Endpoint": "http://127.0.0.1:8000/", "ApiKeyEnvironmentVariable": "LLM_KEY"},
        "Prices": {"stub-model": {"InputPer1K": 0.5, "OutputPer1K": "1.5"}}
    }}"#;
    let config =
        NodeConfig::from_json_str(json, Path::new("/etc/node-runtime"), env(&[("LLM_KEY", "sk-from-env")])).unwrap();
    let llm = sandbox_config(&config).llm.expect("an LLM provider");
    assert_eq!(llm.api_key.expose(), "sk-from-env");
    assert_eq!(llm.default_model, "stub-model");
    assert_eq!(llm.prices["stub-model"].output_per_1k, 1.5);
    assert!(matches!(
        &llm.endpoint,
        crate::sandbox::LlmEndpoint::OpenAi { base_url } if base_url == "http://127.0.0.1:8000"
    ));
    assert!(!config.redacted_json().contains("sk-from-env"));

    let unset = NodeConfig::from_json_str(json, Path::new("/etc/node-runtime"), no_env())
        .unwrap_err()
        .to_string();
    assert!(
        unset.contains("AgentRuntime.OpenAI.ApiKeyEnvironmentVariable"),
        "{unset}"
    );
    assert!(unset.contains("LLM_KEY is not set"), "{unset}");
}

#[test]
fn allowed_hosts_are_granted_per_agent_as_a_list_or_a_comma_separated_string() {
    let config = load(
        r#"{"Sandbox": {"AllowedHosts": {
            "invoice-classifier": ["api.example.com", "127.0.0.1:8080"],
            "echo": "a.example.com, b.example.com:443"
        }}}"#,
    )
    .unwrap();
    let grants = sandbox_config(&config).allowed_hosts;
    assert_eq!(grants["invoice-classifier"], ["api.example.com", "127.0.0.1:8080"]);
    assert_eq!(grants["echo"], ["a.example.com", "b.example.com:443"]);

    let bad = load(r#"{"Sandbox": {"AllowedHosts": {"echo": ["https://api.example.com/v1"]}}}"#)
        .unwrap_err()
        .to_string();
    assert!(bad.contains("Sandbox.AllowedHosts.echo"), "{bad}");
    assert!(bad.contains("host:port"), "{bad}");
}

#[test]
fn compiled_components_are_kept_under_the_data_directory_unless_the_bound_is_zero() {
    let config = load(r#"{"NodeRuntime": {"DataDirectory": "state"}}"#).unwrap();
    let cache = sandbox_config(&config).compiled_cache.expect("on by default");
    assert!(cache.dir.ends_with("state/compiled"), "{}", cache.dir.display());
    assert_eq!(cache.max_bytes, 1 << 30);
    let config = load(r#"{"Sandbox": {"CompiledCacheMaxBytes": 0}}"#).unwrap();
    assert_eq!(sandbox_config(&config).compiled_cache, None);
    let config = load(r#"{"Sandbox": {"CompiledCacheMaxBytes": "64MiB"}}"#).unwrap();
    assert_eq!(sandbox_config(&config).compiled_cache.unwrap().max_bytes, 64 << 20);
}

#[test]
fn grants_give_each_agent_directories_environment_names_and_hosts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("ref")).unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let json = r#"{"Sandbox": {
        "AllowedHosts": {"echo": ["old.example.com"]},
        "Grants": {"echo": {
            "Directories": [
                {"HostPath": "ref", "GuestPath": "/ref"},
                {"HostPath": "out", "GuestPath": "/out", "ReadOnly": false}
            ],
            "Environment": ["TENANT_ID", "REGION"],
            "AllowedHosts": "api.example.com:443"
        }}
    }}"#;
    let config = NodeConfig::from_json_str(json, dir.path(), no_env()).unwrap();
    let grants = &sandbox_config(&config).grants["echo"];
    assert_eq!(
        grants.directories,
        [
            crate::sandbox::DirectoryGrant {
                host_path: dir.path().join("ref"),
                guest_path: "/ref".into(),
                read_only: true,
            },
            crate::sandbox::DirectoryGrant {
                host_path: dir.path().join("out"),
                guest_path: "/out".into(),
                read_only: false,
            },
        ]
    );
    assert_eq!(grants.environment, ["TENANT_ID", "REGION"]);
    assert_eq!(grants.http_hosts, ["api.example.com:443"]);
    // The older key keeps working beside it.
    assert_eq!(sandbox_config(&config).allowed_hosts["echo"], ["old.example.com"]);
    assert!(config.ignored_keys.is_empty(), "{:?}", config.ignored_keys);

    // `config check` prints them back, and the output loads as the same.
    let printed = config.redacted_json();
    assert!(printed.contains("\"GuestPath\": \"/out\""), "{printed}");
    let again = NodeConfig::from_json_str(&printed, dir.path(), no_env()).unwrap();
    assert_eq!(again.sandbox.grants, config.sandbox.grants);

    // The environment can grant too, the .NET way.
    let from_env = NodeConfig::from_json_str(
        "{}",
        dir.path(),
        env(&[
            ("Sandbox__Grants__echo__Environment", "A, B"),
            ("Sandbox__Grants__echo__Directories__0__HostPath", "ref"),
            ("Sandbox__Grants__echo__Directories__0__GuestPath", "/ref"),
        ]),
    )
    .unwrap();
    let grants = &from_env.sandbox.grants["echo"];
    assert_eq!(grants.environment, ["A", "B"]);
    assert_eq!(grants.directories[0].host_path, dir.path().join("ref"));
    assert!(grants.directories[0].read_only);
}

#[test]
fn the_reference_nodes_own_foundry_settings_give_no_llm_provider() {
    // Foundry with empty strings and managed identity: not configured, not
    // an error; `llm.chat` answers not-configured.
    let file = fixtures().join("reference-appsettings.json");
    let config = NodeConfig::load(&file, no_env()).unwrap();
    assert!(config.agent_runtime.azure_ai_foundry.use_managed_identity);
    assert!(sandbox_config(&config).llm.is_none());
}
