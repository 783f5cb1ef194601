//! The LLM capability's per-run part: `llm.chat`, chat completion for
//! agents, metered against the run's token budget.
//!
//! Per call: the model is the request's, else the run's metadata
//! `llm.model`, else the node's default; a model off the node's allow-list
//! is refused with `invalid-request`. The prompt's tokens are estimated
//! (`prompt_estimate.rs`); a call whose estimated prompt leaves no room
//! for output in what remains of the run's budget is refused with
//! `budget-exhausted` before anything is sent, and otherwise the request's
//! `max_tokens` is lowered to what remains after the estimated prompt (all
//! of that when the agent gave none). So a run goes over its budget only
//! by what the estimate missed on the one call that crossed it, which the
//! judge tolerates up to a bound (`meters.rs`). Tokens are counted from
//! the provider's `usage` and priced from the node's table. The provider
//! call itself (timeouts bounded by the run's deadline, retries) is the
//! shared client's, in `client.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::Instrument;

use super::client::{CallError, LlmClient, ProviderMessage, ProviderRequest, ProviderTool, ProviderToolCall};
use super::prompt_estimate::estimate_prompt_tokens;
use crate::sandbox::bindings::llm::{ChatRequest, ChatResponse, Host, LlmError, Role, Usage};
use crate::sandbox::state::RunState;

/// The events' target from before this file moved, so that log filters
/// written for it (`Logging.LogLevel`) still apply.
const LOG_TARGET: &str = "node_runtime::sandbox::capabilities::llm";

/// The metadata key through which a run names its model.
const MODEL_METADATA_KEY: &str = "llm.model";

/// What one run needs to call the provider.
#[derive(Debug, Clone)]
pub(crate) struct RunLlm {
    pub client: Arc<LlmClient>,
    /// The run's metadata `llm.model`, if any.
    pub agent_model: Option<String>,
}

impl RunLlm {
    /// The node's provider, for a run with this metadata (a blank
    /// `llm.model` names no model).
    pub(crate) fn new(client: &Arc<LlmClient>, metadata: &BTreeMap<String, String>) -> RunLlm {
        RunLlm {
            client: client.clone(),
            agent_model: metadata
                .get(MODEL_METADATA_KEY)
                .filter(|model| !model.trim().is_empty())
                .cloned(),
        }
    }
}

/// Why a metered call failed: the agent's error, and whether the same
/// call could succeed later (the provider failed on every attempt with a
/// 429, a 5xx or a network error).
#[derive(Debug, Clone)]
pub(crate) struct ChatFailure {
    pub error: LlmError,
    pub retryable: bool,
}

impl From<LlmError> for ChatFailure {
    fn from(error: LlmError) -> ChatFailure {
        ChatFailure {
            error,
            retryable: false,
        }
    }
}

/// One chat completion as either version of the agent world (or the
/// built-in declarative agent) asks for it, before the node's checks.
#[derive(Debug, Clone, Default)]
pub(crate) struct LlmCall {
    pub model: Option<String>,
    pub messages: Vec<ProviderMessage>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub tools: Vec<ProviderTool>,
    pub response_format: Option<serde_json::Value>,
    /// Bytes the guest handed over for it (copied out and written again as
    /// JSON): host work the run pays for in fuel.
    pub bytes: usize,
}

/// A metered answer.
#[derive(Debug, Clone)]
pub(crate) struct LlmAnswer {
    pub content: String,
    pub tool_calls: Vec<ProviderToolCall>,
    pub model: String,
    pub tokens_in: u32,
    pub tokens_out: u32,
    pub finish_reason: String,
}

impl Host for RunState {
    async fn chat(&mut self, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        self.metered_chat(request).await.map_err(|failure| failure.error)
    }
}

impl RunState {
    /// `llm.chat` of the agent world 0.1.0 (text messages only), metered:
    /// the guest's call, and the built-in declarative agent's
    /// (`sandbox/declarative`), which goes through exactly these checks.
    pub(crate) async fn metered_chat(&mut self, request: ChatRequest) -> Result<ChatResponse, ChatFailure> {
        let bytes = request.messages.iter().map(|message| message.content.len()).sum();
        let call = LlmCall {
            model: request.model,
            messages: request
                .messages
                .into_iter()
                .map(|message| {
                    let role = match message.role {
                        Role::System => "system",
                        Role::User => "user",
                        Role::Assistant => "assistant",
                    };
                    ProviderMessage::text(role, message.content)
                })
                .collect(),
            max_tokens: request.max_tokens,
            temperature: request.temperature,
            bytes,
            ..LlmCall::default()
        };
        let answer = self.metered_call(call).await?;
        Ok(ChatResponse {
            content: answer.content,
            model: answer.model,
            usage: Usage {
                tokens_in: answer.tokens_in,
                tokens_out: answer.tokens_out,
            },
            finish_reason: answer.finish_reason,
        })
    }

    /// One chat completion, whichever world asked: the model allowed, the
    /// prompt (tool schemas included) estimated against what remains of
    /// the run's token budget before anything is sent, `max_tokens`
    /// lowered to fit, the provider's usage counted and priced.
    pub(crate) async fn metered_call(&mut self, request: LlmCall) -> Result<LlmAnswer, ChatFailure> {
        let Some(llm) = self.llm.clone() else {
            return Err(ChatFailure::from(LlmError::NotConfigured(
                "no LLM endpoint configured on this node".to_string(),
            )));
        };
        // The messages were copied out of the guest, and are written out
        // again as JSON: host work paid in fuel like a log line's.
        let bytes = request.bytes;
        self.host_work_fuel += bytes as u64 * crate::sandbox::capabilities::log::FUEL_PER_BYTE;
        if request.messages.is_empty() {
            return Err(ChatFailure::from(LlmError::InvalidRequest(
                "the chat request has no messages; give at least one".to_string(),
            )));
        }
        let settings = llm.client.settings();
        let temperature = request.temperature.unwrap_or(settings.default_temperature);
        if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
            return Err(ChatFailure::from(LlmError::InvalidRequest(format!(
                "temperature {temperature} is not a number from 0 to 2, the range providers take"
            ))));
        }
        let model = request
            .model
            .filter(|model| !model.trim().is_empty())
            .or_else(|| llm.agent_model.clone())
            .unwrap_or_else(|| settings.default_model.clone());
        if !settings.allows(&model) {
            return Err(ChatFailure::from(LlmError::InvalidRequest(format!(
                "the model {:?} is not allowed on this node; ask for one of AgentRuntime.AllowedModels \
                 ({}), or have the operator add it there",
                crate::sandbox::capabilities::log::truncate(&model, 200),
                settings.allowed_models.iter().cloned().collect::<Vec<_>>().join(", ")
            ))));
        }
        let remaining = self.tokens.remaining();
        if remaining == 0 {
            return Err(ChatFailure::from(LlmError::BudgetExhausted(format!(
                "the run's LLM token budget of {} is spent ({} used); no call was made",
                self.tokens.limit,
                self.tokens.used()
            ))));
        }
        let prompt_tokens = estimate_prompt_tokens(&request.messages, &request.tools, request.response_format.as_ref());
        if prompt_tokens >= remaining {
            return Err(ChatFailure::from(LlmError::BudgetExhausted(format!(
                "the prompt is about {prompt_tokens} tokens (estimated from its {bytes} bytes), \
                 which leaves no room for an answer in the {remaining} tokens left of the run's \
                 LLM token budget of {}; no call was made; send a shorter prompt",
                self.tokens.limit
            ))));
        }
        let room = remaining - prompt_tokens;
        let max_tokens = match request.max_tokens {
            Some(asked) if asked > 0 => asked.min(room),
            _ => room,
        };
        let provider_request = ProviderRequest {
            model: model.clone(),
            messages: request.messages,
            max_tokens,
            temperature,
            tools: request.tools,
            response_format: request.response_format,
        };

        // One span per call (a child of the run's), for the trace.
        let span = tracing::info_span!(
            target: LOG_TARGET, "llm.chat",
            "llm.model" = %model,
            "llm.max_tokens" = max_tokens,
            "llm.tokens_in" = tracing::field::Empty,
            "llm.tokens_out" = tracing::field::Empty,
            "error" = tracing::field::Empty,
        );
        // Without a usage report the node cannot know what the call cost;
        // it charges the most it may have: the estimated prompt and every
        // token the answer was allowed, so the budget still holds.
        let charged = |usage: Option<(u32, u32)>| {
            usage.unwrap_or_else(|| {
                tracing::warn!(
                    target: LOG_TARGET, model = %model,
                    "the LLM provider reported no usage: charging the estimated prompt and max_tokens"
                );
                (prompt_tokens, max_tokens)
            })
        };
        // Cut off by the run's deadline while it waits, the call may have
        // been answered and billed all the same: the run's reading charges
        // it the most it may cost, as an answer without usage is, until it
        // comes back with what it cost.
        let mut waiting = self.tokens.clone();
        waiting.record(prompt_tokens, max_tokens, max_tokens);
        waiting.usd_cost += llm.client.price_unanswered(&model, prompt_tokens, max_tokens);
        self.last_reading.refresh_charging(self, waiting);
        let answered = llm
            .client
            .chat(&provider_request, self.host_deadline)
            .instrument(span.clone())
            .await;
        self.last_reading.refresh(self);
        let answer = match answered {
            Ok(answer) => answer,
            Err(err) => {
                let (error, retryable) = match err {
                    CallError::Timeout(message) => (LlmError::Timeout(message), false),
                    CallError::Provider(message) => (LlmError::Provider(message), false),
                    CallError::Exhausted(message) => (LlmError::Provider(message), true),
                    CallError::TooLarge(message) => (LlmError::InvalidRequest(message), false),
                    // Answered, perhaps billed: metered before it fails.
                    CallError::Unusable { message, usage } => {
                        let (tokens_in, tokens_out) = charged(usage);
                        self.tokens.record(tokens_in, tokens_out, max_tokens);
                        self.tokens.usd_cost += llm.client.price(&model, &model, tokens_in, tokens_out);
                        self.last_reading.refresh(self);
                        (LlmError::Provider(message), false)
                    }
                };
                span.record("error", tracing::field::debug(&error));
                return Err(ChatFailure { error, retryable });
            }
        };
        let (tokens_in, tokens_out) = charged(answer.usage);
        span.record("llm.tokens_in", tokens_in);
        span.record("llm.tokens_out", tokens_out);
        let tokens = &mut self.tokens;
        tokens.record(tokens_in, tokens_out, max_tokens);
        if tokens.used() > tokens.limit {
            tracing::warn!(
                target: LOG_TARGET, used = tokens.used(),
                limit = tokens.limit,
                estimated_prompt = prompt_tokens,
                tokens_in,
                "this LLM call took the run over its token budget (its prompt was more than estimated, \
                 or the provider wrote past max_tokens); later calls are refused"
            );
        }
        tokens.usd_cost += llm.client.price(&model, &answer.model, tokens_in, tokens_out);
        self.last_reading.refresh(self);
        if let Some(refusal) = answer.refusal {
            // Metered and priced above: a refusal costs its tokens too.
            return Err(LlmError::Provider(format!(
                "the model refused to answer: {}",
                crate::sandbox::capabilities::log::truncate(&refusal, 500)
            ))
            .into());
        }
        Ok(LlmAnswer {
            content: answer.content,
            tool_calls: answer.tool_calls,
            model: answer.model,
            tokens_in,
            tokens_out,
            finish_reason: answer.finish_reason,
        })
    }
}
