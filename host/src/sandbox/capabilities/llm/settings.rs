//! The LLM capability's settings: where chat completions go, with which
//! key, model and temperature by default, and what each model costs.
//!
//! The node, not the agent, holds the endpoint and its key. [`LlmSettings`]
//! says where to send a chat completion (an OpenAI-compatible endpoint or
//! an Azure OpenAI deployment), which model and temperature to use when the
//! agent does not say, how long one request may take, and what each model
//! costs ([`ModelPrice`]), and which models agents may ask for at all
//! (`allowed_models`).
//!
//! The key is a [`Secret`]: `Debug` prints `***`, it goes into exactly one
//! header, and error messages quoting a provider's answer have it masked
//! (`client.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use support::Secret;

/// The API version the Azure flavour asks for.
pub const AZURE_API_VERSION: &str = "2024-06-01";

/// Where chat completions go and how they are priced.
#[derive(Clone)]
pub struct LlmSettings {
    pub endpoint: LlmEndpoint,
    /// Sent as `Authorization: Bearer` (OpenAI) or `api-key` (Azure).
    pub api_key: Secret,
    /// The model of a call that names none, when the run's metadata has no
    /// `llm.model` either.
    pub default_model: String,
    /// The temperature of a call that gives none.
    pub default_temperature: f32,
    /// The longest one request may take; the run's deadline may cut it
    /// shorter.
    pub request_timeout: Duration,
    /// USD per 1k tokens, by model name. A model not listed costs 0, and
    /// is warned about once: at start-up for the default model and the
    /// allowed ones, else at its first call.
    pub prices: BTreeMap<String, ModelPrice>,
    /// The models a call may name (the default model included); empty:
    /// any. A call for another model is refused before anything is sent.
    pub allowed_models: BTreeSet<String>,
}

/// The provider's flavour of the chat-completions API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LlmEndpoint {
    /// `POST {base_url}/v1/chat/completions` with a bearer key.
    OpenAi { base_url: String },
    /// `POST {base_url}/openai/deployments/{deployment}/chat/completions
    /// ?api-version=2024-06-01` with an `api-key` header.
    Azure { base_url: String, deployment: String },
}

impl LlmEndpoint {
    /// The URL a chat completion is posted to.
    pub fn url(&self) -> String {
        match self {
            LlmEndpoint::OpenAi { base_url } => {
                format!("{}/v1/chat/completions", base_url.trim_end_matches('/'))
            }
            LlmEndpoint::Azure { base_url, deployment } => format!(
                "{}/openai/deployments/{deployment}/chat/completions?api-version={AZURE_API_VERSION}",
                base_url.trim_end_matches('/')
            ),
        }
    }
}

/// USD per 1000 tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ModelPrice {
    pub input_per_1k: f64,
    pub output_per_1k: f64,
}

impl ModelPrice {
    pub fn cost(&self, tokens_in: u32, tokens_out: u32) -> f64 {
        (f64::from(tokens_in) * self.input_per_1k + f64::from(tokens_out) * self.output_per_1k) / 1000.0
    }
}

impl LlmSettings {
    /// Settings for an OpenAI-compatible endpoint with the usual defaults
    /// (60 s per request, no prices).
    pub fn openai(base_url: impl Into<String>, api_key: Secret, default_model: impl Into<String>) -> Self {
        LlmSettings {
            endpoint: LlmEndpoint::OpenAi {
                base_url: base_url.into(),
            },
            api_key,
            default_model: default_model.into(),
            default_temperature: 0.7,
            request_timeout: Duration::from_secs(60),
            prices: BTreeMap::new(),
            allowed_models: BTreeSet::new(),
        }
    }

    /// Whether a call may name `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.allowed_models.is_empty() || self.allowed_models.contains(model)
    }

    /// The models the settings name (the default and the allowed ones)
    /// that have no price: their calls would cost 0.
    pub fn unpriced_models(&self) -> Vec<&str> {
        std::iter::once(self.default_model.as_str())
            .chain(self.allowed_models.iter().map(String::as_str))
            .filter(|model| !self.prices.contains_key(*model))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }
}

// By hand, so that the key can never reach a log through `{:?}`.
impl fmt::Debug for LlmSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmSettings")
            .field("endpoint", &self.endpoint)
            .field("api_key", &"***")
            .field("default_model", &self.default_model)
            .field("default_temperature", &self.default_temperature)
            .field("request_timeout", &self.request_timeout)
            .field("prices", &self.prices)
            .field("allowed_models", &self.allowed_models)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_each_flavour() {
        let openai = LlmEndpoint::OpenAi {
            base_url: "http://127.0.0.1:9/".into(),
        };
        assert_eq!(openai.url(), "http://127.0.0.1:9/v1/chat/completions");
        let azure = LlmEndpoint::Azure {
            base_url: "https://x.openai.azure.com".into(),
            deployment: "gpt".into(),
        };
        assert_eq!(
            azure.url(),
            "https://x.openai.azure.com/openai/deployments/gpt/chat/completions?api-version=2024-06-01"
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let settings = LlmSettings::openai("http://x", Secret::new("sk-very-secret"), "m");
        assert!(!format!("{settings:?}").contains("sk-very-secret"));
    }

    #[test]
    fn an_empty_allow_list_allows_any_model_and_unpriced_models_are_named() {
        let mut settings = LlmSettings::openai("http://x", Secret::new("k"), "default");
        assert!(settings.allows("anything"));
        assert_eq!(settings.unpriced_models(), ["default"]);
        settings.allowed_models = ["priced".to_string(), "free".to_string()].into();
        settings.prices.insert("priced".into(), ModelPrice::default());
        assert!(settings.allows("priced") && !settings.allows("anything"));
        assert_eq!(settings.unpriced_models(), ["default", "free"]);
    }

    #[test]
    fn prices_are_per_thousand_tokens() {
        let price = ModelPrice {
            input_per_1k: 0.15,
            output_per_1k: 0.6,
        };
        assert!((price.cost(1000, 500) - 0.45).abs() < 1e-12);
    }
}
