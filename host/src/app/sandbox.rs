//! The sandbox a configuration asks for: `Sandbox` for the ceilings,
//! `AgentRuntime` for tokens, duration and the model endpoint.

use crate::config::{AgentRuntimeSection, DeclarativeAgentsSection, NodeConfig};
use crate::sandbox::declarative::{BoundSecret, DeclarativeSettings, Secrets};
use crate::sandbox::signature::TrustedKeys;
use crate::sandbox::{
    CompiledCacheSettings, EngineSettings, HostGrant, LlmEndpoint, LlmSettings, NodeLimits, SandboxConfig,
};
use support::Secret;

/// The sandbox's settings: `Sandbox` for the ceilings, `AgentRuntime` for
/// tokens and duration, and a pool sized for [`NodeConfig::slots`].
pub fn sandbox_config(config: &NodeConfig) -> SandboxConfig {
    let sandbox = &config.sandbox;
    SandboxConfig {
        limits: NodeLimits {
            fuel: sandbox.default_fuel,
            memory_bytes: sandbox.max_memory_bytes,
            table_elements: sandbox.max_table_elements,
            duration: config.agent_runtime.max_duration,
            tokens: config.agent_runtime.max_tokens,
            result_bytes: sandbox.max_result_bytes,
            log_lines: sandbox.max_log_lines,
            log_bytes: sandbox.max_log_bytes,
            ..NodeLimits::default()
        },
        engine: EngineSettings {
            allocator: sandbox.allocator,
            execution: sandbox.engine,
            max_concurrent_runs: config.slots(),
            ..EngineSettings::default()
        },
        llm: llm_settings(&config.agent_runtime),
        allowed_hosts: sandbox.allowed_hosts.clone(),
        compiled_cache: (sandbox.compiled_cache_max_bytes > 0).then(|| CompiledCacheSettings {
            dir: config.node_runtime.data_directory.join("compiled"),
            max_bytes: sandbox.compiled_cache_max_bytes,
        }),
        compile_limits: sandbox.compile_limits,
        grants: sandbox.grants.clone(),
        declarative: declarative_settings(&config.declarative_agents),
        trusted_keys: trusted_keys(config),
    }
}

/// `AgentStore.TrustedSigningKeys`, read by the binding.
pub fn trusted_keys(config: &NodeConfig) -> TrustedKeys {
    TrustedKeys::new(
        config
            .agent_store
            .trusted_signing_keys
            .iter()
            .map(|trusted| trusted.key),
    )
}

/// `DeclarativeAgents` as the built-in agent's settings: the node-wide
/// output hosts and the secrets with their hosts (all checked by the
/// configuration's binding).
pub fn declarative_settings(section: &DeclarativeAgentsSection) -> DeclarativeSettings {
    let grants = |hosts: &[String]| hosts.iter().filter_map(|host| HostGrant::parse(host).ok()).collect();
    DeclarativeSettings {
        output_hosts: grants(&section.allowed_hosts),
        secrets: Secrets(
            section
                .secrets
                .iter()
                .map(|(name, secret)| {
                    let bound = BoundSecret {
                        value: secret.value.clone(),
                        hosts: grants(&secret.hosts),
                    };
                    (name.clone(), bound)
                })
                .collect(),
        ),
    }
}

/// `AgentRuntime` as the sandbox's LLM provider: a generic OpenAI-compatible
/// endpoint when `OpenAI.Endpoint` is set; else the Azure flavour when
/// `AzureAIFoundry` has an endpoint, a deployment and a key; otherwise none
/// (`llm.chat` answers `not-configured`). Managed identity is not
/// supported: without `ApiKey` there is no Azure provider.
pub fn llm_settings(agent: &AgentRuntimeSection) -> Option<LlmSettings> {
    if let Some(endpoint) = &agent.openai.endpoint {
        let mut settings = LlmSettings::openai(
            endpoint.to_string().trim_end_matches('/'),
            agent
                .openai
                .api_key
                .clone()
                .unwrap_or_else(|| Secret::new(String::new())),
            agent.default_model.clone(),
        );
        settings.default_temperature = agent.default_temperature as f32;
        settings.request_timeout = agent.max_duration;
        settings.prices = agent.prices.clone();
        settings.allowed_models = agent.allowed_models.clone();
        return Some(settings);
    }
    let foundry = &agent.azure_ai_foundry;
    let (Some(endpoint), Some(deployment), Some(key)) = (&foundry.endpoint, &foundry.deployment_name, &foundry.api_key)
    else {
        return None;
    };
    Some(LlmSettings {
        endpoint: LlmEndpoint::Azure {
            base_url: endpoint.to_string(),
            deployment: deployment.clone(),
        },
        api_key: key.clone(),
        default_model: agent.default_model.clone(),
        default_temperature: agent.default_temperature as f32,
        request_timeout: agent.max_duration,
        prices: agent.prices.clone(),
        allowed_models: agent.allowed_models.clone(),
    })
}
