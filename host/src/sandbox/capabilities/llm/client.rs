//! The LLM capability's shared part: the one HTTP client every run's
//! `llm.chat` calls go through.
//!
//! [`LlmClient`] holds the node's [`LlmSettings`] and sends one request per
//! attempt, retrying 429 and 5xx answers with backoff while the run's
//! deadline allows; the metering (budget, token counts, cost) is done by
//! the per-run part in `chat.rs`, which owns the run's meters. Error
//! messages quoting a provider's answer have the key masked.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::sync::lock;

use serde::Deserialize;
use thiserror::Error;

use support::Backoff;

use super::settings::{LlmEndpoint, LlmSettings};

/// The events' target from before this file moved, so that log filters
/// written for it (`Logging.LogLevel`) still apply.
const LOG_TARGET: &str = "node_runtime::sandbox::llm";

/// How much of a provider's error body an error message quotes.
const BODY_QUOTE: usize = 200;
/// Attempts per call at most, however much time the deadline leaves.
const MAX_ATTEMPTS: u32 = 5;

#[derive(Debug, Error)]
#[error("could not build the LLM HTTP client: {0}")]
pub struct LlmClientError(String);

/// One chat completion as sent to the provider (OpenAI's shape, which
/// Azure OpenAI shares).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ProviderRequest {
    pub model: String,
    pub messages: Vec<ProviderMessage>,
    pub max_tokens: u32,
    pub temperature: f32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ProviderTool>,
    /// `{"type": "text" | "json_object" | "json_schema", ...}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<serde_json::Value>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ProviderMessage {
    pub role: &'static str,
    pub content: String,
    /// An assistant message's tool calls, handed back as the model gave them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ProviderToolCall>,
    /// A tool message: the call it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ProviderMessage {
    /// A message of text only.
    pub(crate) fn text(role: &'static str, content: String) -> ProviderMessage {
        ProviderMessage {
            role,
            content,
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A tool the model may call: `{"type": "function", "function": {...}}`.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ProviderTool {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: ProviderFunction,
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ProviderFunction {
    pub name: String,
    pub description: String,
    /// A JSON Schema, parsed from the agent's text (so that the node sends
    /// JSON, never text it did not check).
    pub parameters: serde_json::Value,
}

/// A tool call, in a request (an assistant message handed back) and as
/// read from an answer.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub(crate) struct ProviderToolCall {
    #[serde(default)]
    pub id: String,
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    #[serde(default)]
    pub function: ProviderCalledFunction,
}

#[derive(Debug, Clone, Default, serde::Serialize, Deserialize)]
pub(crate) struct ProviderCalledFunction {
    #[serde(default)]
    pub name: String,
    /// JSON text, as the model wrote it.
    #[serde(default, deserialize_with = "arguments_text")]
    pub arguments: String,
}

/// What stands for arguments that were not JSON text (an object, an
/// array...): skipped unbuilt, and the answer refused as unusable.
const NOT_TEXT: &str = "\u{0}not-text";

/// The arguments as the text they must be; `null` as `{}`; anything else
/// skipped without being built (a hostile provider's 2 MiB of nested
/// arrays would otherwise cost the host many times that) and marked.
fn arguments_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct Text;
    impl<'de> serde::de::Visitor<'de> for Text {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("the arguments as JSON text")
        }
        fn visit_str<E>(self, text: &str) -> Result<String, E> {
            Ok(text.to_string())
        }
        fn visit_string<E>(self, text: String) -> Result<String, E> {
            Ok(text)
        }
        fn visit_unit<E>(self) -> Result<String, E> {
            Ok("{}".to_string())
        }
        fn visit_none<E>(self) -> Result<String, E> {
            Ok("{}".to_string())
        }
        fn visit_bool<E>(self, _: bool) -> Result<String, E> {
            Ok(NOT_TEXT.to_string())
        }
        fn visit_i64<E>(self, _: i64) -> Result<String, E> {
            Ok(NOT_TEXT.to_string())
        }
        fn visit_u64<E>(self, _: u64) -> Result<String, E> {
            Ok(NOT_TEXT.to_string())
        }
        fn visit_f64<E>(self, _: f64) -> Result<String, E> {
            Ok(NOT_TEXT.to_string())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(NOT_TEXT.to_string())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
            while map
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {}
            Ok(NOT_TEXT.to_string())
        }
    }
    deserializer.deserialize_any(Text)
}

/// At most [`MAX_TOOL_CALLS`] tool calls, built; the rest only counted
/// (skipped unbuilt, so a flood of them costs no memory).
#[derive(Debug, Default)]
struct ToolCalls {
    kept: Vec<ProviderToolCall>,
    total: usize,
}

impl<'de> Deserialize<'de> for ToolCalls {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<ToolCalls, D::Error> {
        struct Bounded;
        impl<'de> serde::de::Visitor<'de> for Bounded {
            type Value = ToolCalls;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of tool calls")
            }
            fn visit_unit<E>(self) -> Result<ToolCalls, E> {
                Ok(ToolCalls::default())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<ToolCalls, A::Error> {
                let mut calls = ToolCalls::default();
                while calls.kept.len() < MAX_TOOL_CALLS {
                    match seq.next_element::<ProviderToolCall>()? {
                        Some(call) => calls.kept.push(call),
                        None => {
                            calls.total = calls.kept.len();
                            return Ok(calls);
                        }
                    }
                }
                calls.total = calls.kept.len();
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    calls.total += 1;
                }
                Ok(calls)
            }
        }
        deserializer.deserialize_any(Bounded)
    }
}

fn function_kind() -> String {
    "function".to_string()
}

/// The most tool calls read from one answer.
pub const MAX_TOOL_CALLS: usize = 128;

/// What the node reads of a provider's answer; everything is optional, so
/// an odd answer becomes a clear error rather than a parse failure deep in
/// serde.
#[derive(Debug, Deserialize)]
struct ProviderResponse {
    #[serde(default)]
    model: Option<String>,
    /// Only the first choice is read: the others (n > 1) are never asked
    /// for, and a provider that sends thousands must not make the node
    /// build them.
    #[serde(default, deserialize_with = "first_choice")]
    choices: Option<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

/// The first element of the `choices` array, the rest skipped unbuilt.
fn first_choice<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Choice>, D::Error> {
    struct First;
    impl<'de> serde::de::Visitor<'de> for First {
        type Value = Option<Choice>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array of choices")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let first = seq.next_element::<Choice>()?;
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(first)
        }
    }
    deserializer.deserialize_seq(First)
}

#[derive(Debug, Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<ChoiceMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
    /// OpenAI's structured refusal: set, with no content, when the model
    /// declines to answer.
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: ToolCalls,
}

#[derive(Debug, Deserialize)]
struct Usage {
    /// Both counts, or the usage is as good as absent: a `usage` object
    /// without them (or with other names) must not make a call free.
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

impl Usage {
    fn counts(&self) -> Option<(u32, u32)> {
        let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        Some((clamp(self.prompt_tokens?), clamp(self.completion_tokens?)))
    }
}

/// A provider's answer, as the capability needs it.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub content: String,
    pub model: String,
    pub finish_reason: String,
    /// The model's refusal, when it declined to answer.
    pub refusal: Option<String>,
    /// The tools the model asked to call, in order.
    pub tool_calls: Vec<ProviderToolCall>,
    /// `None` when the provider reported no usage.
    pub usage: Option<(u32, u32)>,
}

/// The largest answer the node reads from the LLM provider. A completion
/// of 128,000 tokens is about half a MiB of JSON.
pub const LLM_RESPONSE_BYTES: usize = 2 << 20;

/// The largest request the node sends, as JSON: a prompt of 128,000
/// tokens is about half a MiB, but JSON writes a control character as
/// six bytes, so the agent's text alone does not bound it.
pub const LLM_REQUEST_BYTES: usize = 2 << 20;

/// Why a call failed, before it becomes the guest's `llm-error`.
#[derive(Debug, Clone)]
pub(crate) enum CallError {
    /// The deadline (or the per-request timeout) ran out.
    Timeout(String),
    /// The provider refused or failed.
    Provider(String),
    /// The provider failed in a way that could pass (429, 5xx, a network
    /// error) on every attempt the deadline allowed.
    Exhausted(String),
    /// The request is more than the node sends.
    TooLarge(String),
    /// The provider answered, but not with anything the node can use: the
    /// call may still have been billed, with this usage if it said.
    Unusable { message: String, usage: Option<(u32, u32)> },
}

/// The usage of an answer that did not parse as a chat completion, if a
/// `usage` object can still be read from it.
fn usage_in(body: &[u8]) -> Option<(u32, u32)> {
    #[derive(Deserialize)]
    struct JustUsage {
        usage: Option<Usage>,
    }
    serde_json::from_slice::<JustUsage>(body).ok()?.usage?.counts()
}

/// The settings and the HTTP client every run shares.
pub struct LlmClient {
    settings: LlmSettings,
    http: reqwest::Client,
    /// Models already warned about as missing from the price table.
    unpriced_warned: Mutex<HashSet<String>>,
    /// For a model asked for that has no price: the priced model the
    /// provider last answered as (a few, at most [`ANSWERED_AS_MODELS`]).
    answered_as: Mutex<HashMap<String, String>>,
}

/// How many unpriced models [`LlmClient`] remembers the answering model of.
const ANSWERED_AS_MODELS: usize = 64;

impl fmt::Debug for LlmClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmClient")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl LlmClient {
    pub fn new(settings: LlmSettings) -> Result<Self, LlmClientError> {
        support::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|err| LlmClientError(err.to_string()))?;
        // The models the configuration names are warned about now, once,
        // rather than at some run's first call.
        let unpriced: HashSet<String> = settings.unpriced_models().into_iter().map(str::to_string).collect();
        for model in &unpriced {
            tracing::warn!(
                target: LOG_TARGET, model = %model,
                "no price configured for this LLM model: its calls will cost 0 in every report; \
                 add it to AgentRuntime.Prices"
            );
        }
        Ok(LlmClient {
            settings,
            http,
            unpriced_warned: Mutex::new(unpriced),
            answered_as: Mutex::default(),
        })
    }

    pub fn settings(&self) -> &LlmSettings {
        &self.settings
    }

    /// The cost of a call: priced by the model asked for, else by the one
    /// that answered (providers often answer with a dated variant). An
    /// unknown model costs 0, with one warning per model per process.
    pub(crate) fn price(&self, asked: &str, answered: &str, tokens_in: u32, tokens_out: u32) -> f64 {
        let prices = &self.settings.prices;
        if !prices.contains_key(asked) && prices.contains_key(answered) {
            let mut answered_as = lock(&self.answered_as);
            if answered_as.len() < ANSWERED_AS_MODELS || answered_as.contains_key(asked) {
                answered_as.insert(asked.to_string(), answered.to_string());
            }
        }
        match prices.get(asked).or_else(|| prices.get(answered)) {
            Some(price) => price.cost(tokens_in, tokens_out),
            None => {
                let mut warned = lock(&self.unpriced_warned);
                if warned.insert(asked.to_string()) {
                    tracing::warn!(
                        target: LOG_TARGET, model = asked,
                        "no price configured for this LLM model: its calls cost 0; \
                         add it to AgentRuntime.Prices"
                    );
                }
                0.0
            }
        }
    }

    /// What a call to `asked` that has not answered yet may cost: priced
    /// as [`price`](Self::price) would, the answering model taken to be
    /// the one the provider last answered `asked` as; 0, without a
    /// warning, when neither has a price.
    pub(crate) fn price_unanswered(&self, asked: &str, tokens_in: u32, tokens_out: u32) -> f64 {
        let prices = &self.settings.prices;
        let answered = lock(&self.answered_as).get(asked).cloned();
        prices
            .get(asked)
            .or_else(|| answered.and_then(|answered| prices.get(&answered)))
            .map_or(0.0, |price| price.cost(tokens_in, tokens_out))
    }

    /// Sends `request`, retrying 429 and 5xx with backoff while `deadline`
    /// allows another attempt.
    pub(crate) async fn chat(&self, request: &ProviderRequest, deadline: Instant) -> Result<Answer, CallError> {
        // Serialised once, whatever the retries (a copy per attempt of a
        // large prompt is memory the run does not see), and never past the
        // cap: JSON writes a control character as six bytes.
        let mut json = CappedBuffer::new(LLM_REQUEST_BYTES);
        if let Err(err) = serde_json::to_writer(&mut json, request) {
            return Err(if json.overflowed {
                CallError::TooLarge(format!(
                    "the request is more than the {LLM_REQUEST_BYTES} bytes a call may send as JSON \
                     (JSON writes each control character as six bytes); send a shorter prompt"
                ))
            } else {
                CallError::Provider(format!("could not write the request as JSON: {err}"))
            });
        }
        let body = bytes::Bytes::from(json.bytes);
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut last: Option<CallError> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.out_of_time(last, backoff.attempts()));
            }
            let timeout = left.min(self.settings.request_timeout);
            let error = match self.attempt(request, body.clone(), timeout).await {
                Ok(answer) => return Ok(answer),
                Err(Attempt::Final(error)) => return Err(error),
                Err(Attempt::Retry(error)) => error,
                Err(Attempt::RetryAfter(error, asked)) => {
                    // The provider said when to come back (a 429's
                    // `Retry-After`): not sooner, and not at all when that
                    // is past the deadline.
                    if Instant::now().checked_add(asked).is_none_or(|then| then >= deadline) {
                        return Err(CallError::Exhausted(format!(
                            "{} (it asked to retry after {}s, past the run's deadline)",
                            describe(&error),
                            asked.as_secs()
                        )));
                    }
                    // Never sooner than the backoff either: `Retry-After: 0`
                    // must not make the retries a burst.
                    let wait = asked.max(backoff.next_delay());
                    tracing::warn!(
                        target: LOG_TARGET, attempt = backoff.attempts(),
                        error = %describe(&error),
                        retry_after_s = asked.as_secs(),
                        "LLM call failed; retrying when the provider asked"
                    );
                    if backoff.attempts() >= MAX_ATTEMPTS
                        || Instant::now().checked_add(wait).is_none_or(|then| then >= deadline)
                    {
                        return Err(self.out_of_time(Some(error), backoff.attempts()));
                    }
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            let delay = backoff.next_delay();
            tracing::warn!(
                target: LOG_TARGET, attempt = backoff.attempts(),
                error = %describe(&error),
                "LLM call failed; retrying"
            );
            last = Some(error);
            if backoff.attempts() >= MAX_ATTEMPTS || Instant::now() + delay >= deadline {
                return Err(self.out_of_time(last, backoff.attempts()));
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// The error of a call that ran out of attempts or time: the last
    /// failure, saying how many attempts were made.
    fn out_of_time(&self, last: Option<CallError>, attempts: u32) -> CallError {
        match last {
            None => CallError::Timeout("the run's deadline leaves no time for an LLM call".into()),
            Some(CallError::Timeout(message)) => {
                CallError::Timeout(format!("{message} (gave up after {attempts} attempts)"))
            }
            Some(CallError::Provider(message) | CallError::Exhausted(message)) => {
                CallError::Exhausted(format!("{message} (gave up after {attempts} attempts)"))
            }
            Some(final_error @ (CallError::TooLarge(_) | CallError::Unusable { .. })) => final_error,
        }
    }

    async fn attempt(
        &self,
        request: &ProviderRequest,
        body: bytes::Bytes,
        timeout: Duration,
    ) -> Result<Answer, Attempt> {
        let key = self.settings.api_key.expose();
        let builder = self
            .http
            .post(self.settings.endpoint.url())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body)
            .timeout(timeout);
        let builder = match self.settings.endpoint {
            // A local server (Ollama, llama.cpp) needs no key: none is sent,
            // not an empty `Bearer`.
            LlmEndpoint::OpenAi { .. } if key.is_empty() => builder,
            LlmEndpoint::OpenAi { .. } => builder.bearer_auth(key),
            LlmEndpoint::Azure { .. } => builder.header("api-key", key),
        };
        let response = builder
            .send()
            .await
            .map_err(|err| self.transport_error(&err, timeout))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = match self.read_body(response, timeout).await {
            Ok(body) => body,
            // A 2xx whose body cannot be read whole (too large, cut off,
            // stalled) was answered and perhaps billed: final, and
            // charged as an answer without usage. Retrying would bill it
            // again.
            Err(Attempt::Final(error) | Attempt::Retry(error) | Attempt::RetryAfter(error, _))
                if status.is_success() =>
            {
                return Err(Attempt::Final(CallError::Unusable {
                    message: describe(&error).to_string(),
                    usage: None,
                }));
            }
            Err(other) => return Err(other),
        };
        if !status.is_success() {
            let message = format!(
                "the LLM provider answered {status}: {}",
                self.quote(&String::from_utf8_lossy(quoted(&body)))
            );
            return Err(if status.as_u16() == 429 || status.is_server_error() {
                match retry_after {
                    Some(asked) => Attempt::RetryAfter(CallError::Provider(message), asked),
                    None => Attempt::Retry(CallError::Provider(message)),
                }
            } else {
                Attempt::Final(CallError::Provider(message))
            });
        }
        // From here on the provider answered, and may have billed the call:
        // an answer the node cannot use still carries its usage (or, when
        // it has none to read, is charged the most the call was allowed).
        let parsed: ProviderResponse = serde_json::from_slice(&body).map_err(|err| {
            Attempt::Final(CallError::Unusable {
                message: format!(
                    "the LLM provider's answer is not a chat completion ({err}): {}",
                    self.quote(&String::from_utf8_lossy(quoted(&body)))
                ),
                usage: usage_in(&body),
            })
        })?;
        let usage = parsed.usage.as_ref().and_then(Usage::counts);
        let Some(choice) = parsed.choices else {
            return Err(Attempt::Final(CallError::Unusable {
                message: "the LLM provider's answer has no choices".into(),
                usage,
            }));
        };
        let (content, refusal, tool_calls) = match choice.message {
            Some(message) => (
                message.content,
                message.refusal.filter(|r| !r.is_empty()),
                message.tool_calls,
            ),
            None => (None, None, ToolCalls::default()),
        };
        if tool_calls.total > MAX_TOOL_CALLS {
            return Err(Attempt::Final(CallError::Unusable {
                message: format!(
                    "the LLM provider's answer asks for {} tool calls, more than the {MAX_TOOL_CALLS} the \
                     node reads from one answer",
                    tool_calls.total
                ),
                usage,
            }));
        }
        let tool_calls = tool_calls.kept;
        if tool_calls.iter().any(|call| call.function.arguments == NOT_TEXT) {
            return Err(Attempt::Final(CallError::Unusable {
                message: "the LLM provider's answer has tool-call arguments that are not JSON text (the \
                          chat-completions shape sends them as a string)"
                    .into(),
                usage,
            }));
        }
        Ok(Answer {
            content: content.unwrap_or_default(),
            refusal,
            tool_calls,
            model: parsed.model.unwrap_or_else(|| request.model.clone()),
            finish_reason: choice.finish_reason.unwrap_or_default(),
            usage,
        })
    }

    /// The answer's body, at most [`LLM_RESPONSE_BYTES`]: the provider is
    /// trusted with the key, not with the node's memory.
    async fn read_body(&self, mut response: reqwest::Response, timeout: Duration) -> Result<Vec<u8>, Attempt> {
        let too_large = || {
            Attempt::Final(CallError::Provider(format!(
                "the LLM provider's answer is larger than {} bytes, the most the node reads; \
                 lower max_tokens",
                LLM_RESPONSE_BYTES
            )))
        };
        if response
            .content_length()
            .is_some_and(|length| length > LLM_RESPONSE_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| self.transport_error(&err, timeout))?
        {
            if body.len() + chunk.len() > LLM_RESPONSE_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// A request that got no answer: a timeout, or a connection failure
    /// (retried: the provider may be restarting).
    fn transport_error(&self, err: &reqwest::Error, timeout: Duration) -> Attempt {
        if err.is_timeout() {
            return Attempt::Retry(CallError::Timeout(format!(
                "the LLM provider did not answer within {}",
                humantime::format_duration(Duration::from_millis(timeout.as_millis() as u64))
            )));
        }
        let mut message = format!("could not reach the LLM provider: {err}");
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        Attempt::Retry(CallError::Provider(self.mask(&message)))
    }

    /// A short, key-free quote of a provider's body.
    fn quote(&self, body: &str) -> String {
        let body = body.trim();
        let mut end = body.len().min(BODY_QUOTE);
        while !body.is_char_boundary(end) {
            end -= 1;
        }
        let cut = if end < body.len() { "..." } else { "" };
        self.mask(&format!("{}{cut}", &body[..end]))
    }

    /// Masks the key, should a provider (or a proxy) echo it back.
    fn mask(&self, text: &str) -> String {
        let key = self.settings.api_key.expose();
        if key.is_empty() {
            text.to_string()
        } else {
            text.replace(key, "***")
        }
    }
}

/// The start of a body, enough for [`LlmClient::quote`].
fn quoted(body: &[u8]) -> &[u8] {
    &body[..body.len().min(4 * BODY_QUOTE)]
}

/// A `Vec` that refuses to grow past its cap: `serde_json` stops writing
/// at the first refused write.
struct CappedBuffer {
    bytes: Vec<u8>,
    cap: usize,
    overflowed: bool,
}

impl CappedBuffer {
    fn new(cap: usize) -> Self {
        CappedBuffer {
            bytes: Vec::new(),
            cap,
            overflowed: false,
        }
    }
}

impl std::io::Write for CappedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.cap {
            self.overflowed = true;
            return Err(std::io::Error::other("over the cap"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Attempt {
    Retry(CallError),
    /// Retry no sooner than the provider asked.
    RetryAfter(CallError, Duration),
    Final(CallError),
}

fn describe(error: &CallError) -> &str {
    match error {
        CallError::Timeout(message)
        | CallError::Provider(message)
        | CallError::Exhausted(message)
        | CallError::TooLarge(message)
        | CallError::Unusable { message, .. } => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_choice_is_built() {
        let many = format!(
            r#"{{"choices": [{{"message": {{"content": "first"}}}}{}], "model": "m"}}"#,
            ",{}".repeat(100_000)
        );
        let parsed: ProviderResponse = serde_json::from_str(&many).unwrap();
        let content = parsed.choices.and_then(|choice| choice.message).and_then(|m| m.content);
        assert_eq!(content.as_deref(), Some("first"));
        let none: ProviderResponse = serde_json::from_str(r#"{"choices": []}"#).unwrap();
        assert!(none.choices.is_none());
    }

    #[test]
    fn a_request_is_never_written_past_the_cap() {
        let mut capped = CappedBuffer::new(16);
        assert!(serde_json::to_writer(&mut capped, &"\u{1}".repeat(10)).is_err());
        assert!(capped.overflowed && capped.bytes.len() <= 16);
        let mut fits = CappedBuffer::new(16);
        serde_json::to_writer(&mut fits, &"ok").unwrap();
        assert_eq!(fits.bytes, br#""ok""#);
    }

    /// A call still waiting is priced as its answer will be: by the model
    /// asked for, else by the priced model the provider answered it as.
    #[test]
    fn an_unanswered_call_is_priced_as_its_answer_would_be() {
        let mut settings = LlmSettings::openai("http://127.0.0.1:9", support::Secret::new("k"), "alias");
        let price = super::super::settings::ModelPrice {
            input_per_1k: 1.0,
            output_per_1k: 2.0,
        };
        settings.prices.insert("dated-model".into(), price);
        let client = LlmClient::new(settings).unwrap();
        assert_eq!(
            client.price_unanswered("alias", 1000, 1000),
            0.0,
            "nothing answered yet"
        );
        assert_eq!(client.price("alias", "dated-model", 1000, 1000), 3.0);
        assert_eq!(client.price_unanswered("alias", 1000, 1000), 3.0);
        assert_eq!(client.price_unanswered("dated-model", 1000, 0), 1.0);
        assert_eq!(client.price_unanswered("other", 1000, 1000), 0.0);
    }
}
