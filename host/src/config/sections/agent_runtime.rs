//! `AgentRuntime`: per-run defaults and the model endpoint (`OpenAI`,
//! `AzureAIFoundry`), and the token prices (`Prices`).

use std::collections::BTreeMap;

use crate::config::error::ConfigError;
use crate::config::reader::{Reader, Section};
use crate::config::tree::Origin;
use crate::config::{AgentRuntimeSection, AzureAiFoundry, OpenAiSection, Secret};
use crate::sandbox::llm::ModelPrice;

pub(in crate::config) fn bind(reader: &mut Reader<'_>, root: &mut Section) -> Result<AgentRuntimeSection, ConfigError> {
    let defaults = AgentRuntimeSection::default();
    let mut s = reader.section(root, "AgentRuntime")?;
    let default_model = reader.text(&mut s, "DefaultModel", &defaults.default_model)?;
    let default_temperature = reader.value(
        &mut s,
        "DefaultTemperature",
        defaults.default_temperature,
        "a number of 0 or more, e.g. 0.7",
        |scalar| scalar.float().filter(|t| *t >= 0.0),
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
    reader.finish(s);
    Ok(AgentRuntimeSection {
        default_model,
        default_temperature,
        max_tokens,
        max_duration,
        azure_ai_foundry,
        openai,
        prices,
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
    let models: Vec<String> = s.entries.0.iter().map(|(name, _)| name.clone()).collect();
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
