//! `AgentRuntime`: per-run defaults and the model endpoint (`OpenAI`,
//! `AzureAIFoundry`), the token prices (`Prices`) and the models agents
//! may ask for (`AllowedModels`). Their types and
//! defaults, their binding, and their printed view, so that each of their
//! keys is spelt here only.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;
use support::Secret;

use crate::config::effective::{REDACTED, redact_url};
use crate::config::error::ConfigError;
use crate::config::reader::{Reader, Section, names};
use crate::config::tree::Origin;
use crate::sandbox::NodeLimits;
use crate::sandbox::llm::ModelPrice;

/// `AgentRuntime`: per-run defaults and the model endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRuntimeSection {
    /// `DefaultModel`.
    pub default_model: String,
    /// `DefaultTemperature`: 0 to 2.
    pub default_temperature: f64,
    /// `MaxTokens`: the node's token limit per run (a lease's budget may
    /// lower it).
    pub max_tokens: u32,
    /// `MaxDurationSeconds`: the node's wall-clock limit per run.
    pub max_duration: Duration,
    /// `AzureAIFoundry`.
    pub azure_ai_foundry: AzureAiFoundry,
    /// `OpenAI` (this node): a generic OpenAI-compatible endpoint, used
    /// when its `Endpoint` is set (it wins over `AzureAIFoundry`).
    pub openai: OpenAiSection,
    /// `Prices` (this node): USD per 1k input and output tokens by model.
    pub prices: BTreeMap<String, ModelPrice>,
    /// `AllowedModels` (this node): the models a call may name (a list,
    /// or one comma-separated string); empty: any.
    pub allowed_models: BTreeSet<String>,
}

/// `AgentRuntime.OpenAI`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OpenAiSection {
    /// `Endpoint`: `POST {Endpoint}/v1/chat/completions`.
    pub endpoint: Option<http::Uri>,
    /// `ApiKey`, or the value of the variable `ApiKeyEnvironmentVariable`
    /// names.
    pub api_key: Option<Secret>,
    /// `ApiKeyEnvironmentVariable`: the variable the key was read from.
    pub api_key_environment_variable: Option<String>,
}

/// `AgentRuntime.AzureAIFoundry`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AzureAiFoundry {
    /// `Endpoint`: an `http(s)://` URL when set.
    pub endpoint: Option<http::Uri>,
    /// `DeploymentName`.
    pub deployment_name: Option<String>,
    /// `ApiKey`: never printed.
    pub api_key: Option<Secret>,
    /// `UseManagedIdentity`.
    pub use_managed_identity: bool,
}

impl Default for AgentRuntimeSection {
    fn default() -> Self {
        let limits = NodeLimits::default();
        AgentRuntimeSection {
            default_model: "gpt-5-mini".to_string(),
            default_temperature: 0.7,
            max_tokens: limits.tokens,
            max_duration: limits.duration,
            azure_ai_foundry: AzureAiFoundry::default(),
            openai: OpenAiSection::default(),
            prices: BTreeMap::new(),
            allowed_models: BTreeSet::new(),
        }
    }
}

pub(in crate::config) fn bind(reader: &mut Reader<'_>, root: &mut Section) -> Result<AgentRuntimeSection, ConfigError> {
    let defaults = AgentRuntimeSection::default();
    let mut s = reader.section(root, "AgentRuntime")?;
    let default_model = reader.text(&mut s, "DefaultModel", &defaults.default_model)?;
    let default_temperature = reader.value(
        &mut s,
        "DefaultTemperature",
        defaults.default_temperature,
        "a number from 0 to 2 (the range providers take), e.g. 0.7",
        |scalar| scalar.float().filter(|t| (0.0..=2.0).contains(t)),
    )?;
    let max_tokens = reader.integer(
        &mut s,
        "MaxTokens",
        defaults.max_tokens,
        0..=i32::MAX as i128,
        "a whole number of tokens per run, 0 or more, e.g. 4000",
    )?;
    let max_duration = reader.seconds(
        &mut s,
        "MaxDurationSeconds",
        defaults.max_duration,
        1..=i32::MAX as i128,
        "a whole number of seconds greater than 0, e.g. 60",
    )?;
    let azure_ai_foundry = azure_ai_foundry(reader, &mut s)?;
    let openai = openai(reader, &mut s)?;
    let prices = prices(reader, &mut s)?;
    let allowed_models = match s.entries.take("AllowedModels") {
        None => BTreeSet::new(),
        Some(node) => names(&node).into_iter().collect(),
    };
    reader.finish(s);
    Ok(AgentRuntimeSection {
        default_model,
        default_temperature,
        max_tokens,
        max_duration,
        azure_ai_foundry,
        openai,
        prices,
        allowed_models,
    })
}

/// `AgentRuntime.OpenAI`: a generic OpenAI-compatible endpoint. The key
/// comes from `ApiKey` or from the environment variable that
/// `ApiKeyEnvironmentVariable` names (so it need not sit in the file).
fn openai(reader: &mut Reader<'_>, parent: &mut Section) -> Result<OpenAiSection, ConfigError> {
    let mut s = reader.section(parent, "OpenAI")?;
    let endpoint = reader.url(&mut s, "Endpoint", "http://127.0.0.1:8000", true)?.flatten();
    let mut api_key = reader.optional_text(&mut s, "ApiKey")?.map(Secret::new);
    let variable_key = s.key("ApiKeyEnvironmentVariable");
    let (variable, variable_origin) = match reader.setting(&mut s, "ApiKeyEnvironmentVariable", "a string")? {
        None => (None, Origin::Unset),
        Some(setting) => (
            setting.scalar.text().filter(|text| !text.trim().is_empty()),
            setting.origin,
        ),
    };
    if let Some(variable) = &variable {
        match reader.variable(variable) {
            Some(value) if !value.is_empty() => api_key = Some(Secret::new(value.to_string())),
            _ => {
                return Err(reader.invalid(
                    variable_key,
                    format!("{variable:?}"),
                    &variable_origin,
                    format!(
                        "the environment variable {variable} is not set; export it with the \
                         API key, or set AgentRuntime.OpenAI.ApiKey"
                    ),
                ));
            }
        }
    }
    reader.finish(s);
    Ok(OpenAiSection {
        endpoint,
        api_key,
        api_key_environment_variable: variable,
    })
}

/// `AgentRuntime.Prices`: `{"model": {"InputPer1K": 0.15, "OutputPer1K": 0.6}}`.
fn prices(reader: &mut Reader<'_>, parent: &mut Section) -> Result<BTreeMap<String, ModelPrice>, ConfigError> {
    let mut s = reader.section(parent, "Prices")?;
    let models: Vec<String> = s.entries.names();
    let mut prices = BTreeMap::new();
    for model in models {
        let mut m = reader.section(&mut s, &model)?;
        let per_1k = |reader: &Reader<'_>, m: &mut Section, name: &str| {
            reader.value(m, name, 0.0, "USD per 1,000 tokens, 0 or more, e.g. 0.15", |scalar| {
                scalar.float().filter(|price| *price >= 0.0)
            })
        };
        let price = ModelPrice {
            input_per_1k: per_1k(reader, &mut m, "InputPer1K")?,
            output_per_1k: per_1k(reader, &mut m, "OutputPer1K")?,
        };
        reader.finish(m);
        prices.insert(model, price);
    }
    reader.finish(s);
    Ok(prices)
}

fn azure_ai_foundry(reader: &mut Reader<'_>, parent: &mut Section) -> Result<AzureAiFoundry, ConfigError> {
    let mut s = reader.section(parent, "AzureAIFoundry")?;
    let foundry = AzureAiFoundry {
        endpoint: reader
            .url(&mut s, "Endpoint", "https://my-project.services.ai.azure.com", true)?
            .flatten(),
        deployment_name: reader.optional_text(&mut s, "DeploymentName")?,
        api_key: reader.optional_text(&mut s, "ApiKey")?.map(Secret::new),
        use_managed_identity: reader.boolean(&mut s, "UseManagedIdentity", false)?,
    };
    reader.finish(s);
    Ok(foundry)
}

/// `AgentRuntime` as `config check` prints it, the API keys redacted.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(in crate::config) struct View<'a> {
    default_model: &'a str,
    default_temperature: f64,
    max_tokens: u32,
    max_duration_seconds: u64,
    #[serde(rename = "AzureAIFoundry")]
    azure_ai_foundry: AzureAiFoundryView<'a>,
    #[serde(rename = "OpenAI")]
    openai: OpenAiView<'a>,
    prices: BTreeMap<&'a str, PriceView>,
    allowed_models: Vec<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct OpenAiView<'a> {
    endpoint: Option<String>,
    api_key: Option<&'static str>,
    api_key_environment_variable: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct PriceView {
    #[serde(rename = "InputPer1K")]
    input_per_1k: f64,
    #[serde(rename = "OutputPer1K")]
    output_per_1k: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct AzureAiFoundryView<'a> {
    endpoint: Option<String>,
    deployment_name: Option<&'a str>,
    api_key: Option<&'static str>,
    use_managed_identity: bool,
}

impl<'a> View<'a> {
    pub(in crate::config) fn of(agent: &'a AgentRuntimeSection) -> Self {
        let foundry = &agent.azure_ai_foundry;
        let agent_openai = &agent.openai;
        View {
            default_model: &agent.default_model,
            default_temperature: agent.default_temperature,
            max_tokens: agent.max_tokens,
            max_duration_seconds: agent.max_duration.as_secs(),
            azure_ai_foundry: AzureAiFoundryView {
                endpoint: foundry.endpoint.as_ref().map(redact_url),
                deployment_name: foundry.deployment_name.as_deref(),
                api_key: foundry.api_key.as_ref().map(|_| REDACTED),
                use_managed_identity: foundry.use_managed_identity,
            },
            openai: OpenAiView {
                endpoint: agent_openai.endpoint.as_ref().map(redact_url),
                api_key: agent_openai.api_key.as_ref().map(|_| REDACTED),
                api_key_environment_variable: agent_openai.api_key_environment_variable.as_deref(),
            },
            prices: agent
                .prices
                .iter()
                .map(|(model, price)| {
                    (
                        model.as_str(),
                        PriceView {
                            input_per_1k: price.input_per_1k,
                            output_per_1k: price.output_per_1k,
                        },
                    )
                })
                .collect(),
            allowed_models: agent.allowed_models.iter().map(String::as_str).collect(),
        }
    }
}
