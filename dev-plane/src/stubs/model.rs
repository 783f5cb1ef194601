//! The stub model: a deterministic chat-completions endpoint that answers
//! as real providers do, usage numbers included.
//!
//! Two flavours, one server:
//!
//! - OpenAI: `POST /v1/chat/completions`, key as `Authorization: Bearer`;
//!   the behaviour is chosen by the body's `model`.
//! - Azure OpenAI: `POST /openai/deployments/{deployment}/chat/completions
//!   ?api-version=...`, key as `api-key`; the behaviour is chosen by the
//!   deployment (the body's `model` is ignored, as Azure ignores it), and
//!   answers carry Azure's `prompt_filter_results` and per-choice
//!   `content_filter_results`. Without `api-version`: 404, as Azure.
//!
//! Behaviours, by model (or deployment) name:
//!
//! | name | answer |
//! | --- | --- |
//! | [`STUB_ECHO_MODEL`] (`stub-echo`) | a JSON object `{"instructions": <the system messages>, "input": <the last user message>, "model": <name>}`, so a test sees what reached the model |
//! | [`STUB_REFUSAL_MODEL`] (`stub-refusal`) | a refusal: OpenAI `message.refusal` set and `content` null; Azure `finish_reason: "content_filter"` with the filter results saying why |
//! | [`STUB_RATE_LIMITED_MODEL`] (`stub-rate-limited`) | always 429, `Retry-After: 1` and the provider's error body |
//! | `stub-rate-limited-N` (e.g. `stub-rate-limited-2`) | 429 for the first N requests naming it, then answers as `stub-echo` |
//! | [`STUB_MODEL`] (`stub-invoice-model`), and any other name | the invoice classifier: the user message read as an invoice (`vendor`, `number`, `date`, `amount`, `currency`), classified by vendor keyword into the fields the sample classifier returns |
//! | [`STUB_TOOLS_MODEL`] (`stub-tools`) | a scripted tool loop: while the request offers tools and its last message is not a tool result, it asks for the first tool (`finish_reason: "tool_calls"`, call id `call_<turn>`, arguments made from the tool's schema: each string property the last user message, numbers 1, booleans true); once a tool result is the last message, it answers `{"answer": "done", "toolResults": [<each tool message's content, parsed as JSON when it is>]}` |
//! | [`STUB_TOOLS_FOREVER_MODEL`] (`stub-tools-forever`) | asks for the first tool on every turn, never answering: a model that never stops calling tools |
//!
//! Whatever the behaviour, a request with `response_format` of type
//! `json_schema` gets an answer shaped by the schema: an object with each
//! of the schema's properties, the behaviour's own value where its answer
//! has one of that name, else a value of the property's type (the first
//! of an `enum`).
//! Every answer honours `max_completion_tokens` (else `max_tokens`): an
//! answer longer than that (at about four characters a token) is cut, and
//! `finish_reason` is `length`. Usage counts about four characters a token.
//! With [`StubModelOptions::api_key`], a request without that key is 401
//! in the provider's words; by default any key (or none) is accepted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use support::sync::lock;

use super::{Record, RecordedRequest, serve};

/// The invoice classifier's name (the demo's model).
pub const STUB_MODEL: &str = "stub-invoice-model";
/// Answers with what it was told (see the module's table).
pub const STUB_ECHO_MODEL: &str = "stub-echo";
/// Refuses every request.
pub const STUB_REFUSAL_MODEL: &str = "stub-refusal";
/// Answers every request 429; `stub-rate-limited-N`, only the first N.
pub const STUB_RATE_LIMITED_MODEL: &str = "stub-rate-limited";
/// Calls the first tool until a tool result comes back, then answers.
pub const STUB_TOOLS_MODEL: &str = "stub-tools";
/// Calls the first tool on every turn.
pub const STUB_TOOLS_FOREVER_MODEL: &str = "stub-tools-forever";

/// Azure's answer path prefix and suffix.
const AZURE_PREFIX: &str = "/openai/deployments/";
const AZURE_SUFFIX: &str = "/chat/completions";
/// The largest request body the stub reads.
const MAX_BODY: usize = 4 << 20;

/// Keyword in the vendor name -> (category, department).
const RULES: [(&str, &str, &str); 5] = [
    ("paper", "Office Supplies", "Procurement Department"),
    ("server", "Technology/Hardware", "IT Department"),
    ("consult", "Professional Services", "Finance Department"),
    ("water", "Utilities", "Facilities Management"),
    ("air", "Travel & Expenses", "HR Department"),
];

#[derive(Clone, Debug, Default)]
pub struct StubModelOptions {
    /// The key requests must carry (OpenAI: bearer, Azure: `api-key`);
    /// `None`: any.
    pub api_key: Option<String>,
}

/// A running stub model.
pub struct StubModel {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    options: StubModelOptions,
    record: Mutex<Record>,
    /// Requests seen per `stub-rate-limited-N` name.
    limited: Mutex<HashMap<String, u64>>,
}

/// Serves the stub model on a free loopback port; returns its base URL
/// (the server runs until the process ends).
pub async fn start_stub_model() -> std::io::Result<String> {
    StubModel::start().await.map(|model| model.url())
}

impl StubModel {
    pub async fn start() -> std::io::Result<StubModel> {
        StubModel::start_with(StubModelOptions::default()).await
    }

    pub async fn start_with(options: StubModelOptions) -> std::io::Result<StubModel> {
        let shared = Arc::new(Shared {
            options,
            ..Shared::default()
        });
        let app = axum::Router::new().fallback(answer).with_state(Arc::clone(&shared));
        let addr = serve(app).await?;
        Ok(StubModel { addr, shared })
    }

    /// The base URL, e.g. `http://127.0.0.1:40123` (the node's
    /// `OpenAI.Endpoint` or Azure endpoint).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many requests arrived, whatever was answered.
    pub fn request_count(&self) -> u64 {
        lock(&self.shared.record).count
    }

    /// The newest requests (at most [`super::MAX_RECORDED`]), oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.record).kept.iter().cloned().collect()
    }
}

/// Which provider a request was made to.
#[derive(Clone, Copy, PartialEq)]
enum Flavour {
    OpenAi,
    Azure,
}

async fn answer(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY).await.unwrap_or_default();
    let response = respond(&shared, &parts, &body);
    lock(&shared.record).push(RecordedRequest::of(&parts, &body, response.status().as_u16()));
    response
}

fn respond(shared: &Shared, parts: &axum::http::request::Parts, body: &[u8]) -> Response {
    let path = parts.uri.path();
    let (flavour, deployment) = if path == "/v1/chat/completions" {
        (Flavour::OpenAi, None)
    } else if let Some(deployment) = path
        .strip_prefix(AZURE_PREFIX)
        .and_then(|rest| rest.strip_suffix(AZURE_SUFFIX))
        .filter(|deployment| !deployment.is_empty() && !deployment.contains('/'))
    {
        (Flavour::Azure, Some(deployment.to_string()))
    } else {
        return provider_error(
            Flavour::OpenAi,
            StatusCode::NOT_FOUND,
            "404",
            &format!(
                "Unknown path {path}: the stub model serves POST /v1/chat/completions (OpenAI) and POST /openai/deployments/{{deployment}}/chat/completions?api-version=... (Azure)"
            ),
        );
    };
    if parts.method != axum::http::Method::POST {
        return provider_error(flavour, StatusCode::METHOD_NOT_ALLOWED, "405", "Use POST");
    }
    if flavour == Flavour::Azure && !parts.uri.query().unwrap_or_default().contains("api-version=") {
        // Azure answers a request without an API version as an unknown resource.
        return provider_error(flavour, StatusCode::NOT_FOUND, "404", "Resource not found");
    }
    if let Some(refusal) = unauthorized(&shared.options, flavour, &parts.headers) {
        return refusal;
    }
    let request: Value = match serde_json::from_slice(body) {
        Ok(request @ Value::Object(_)) => request,
        _ => {
            return provider_error(
                flavour,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "We could not parse the JSON body of your request. The body must be a JSON object.",
            );
        }
    };
    let Some(messages) = request["messages"].as_array() else {
        return provider_error(
            flavour,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "Missing required parameter: 'messages'.",
        );
    };
    let model = match (&deployment, request["model"].as_str()) {
        (Some(deployment), _) => deployment.clone(),
        (None, Some(model)) => model.to_string(),
        (None, None) => {
            return provider_error(
                flavour,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "you must provide a model parameter",
            );
        }
    };
    // The prompt as a provider counts it: the messages, the tool calls
    // handed back, and the tool schemas.
    let prompt_chars: usize = messages
        .iter()
        .map(|m| m["content"].as_str().map_or(0, str::len) + m.get("tool_calls").map_or(0, |c| c.to_string().len()))
        .sum::<usize>()
        + request.get("tools").map_or(0, |tools| tools.to_string().len());
    let prompt_tokens = tokens(prompt_chars);
    let max_tokens = request["max_completion_tokens"]
        .as_u64()
        .or_else(|| request["max_tokens"].as_u64());

    if model == STUB_RATE_LIMITED_MODEL {
        return rate_limited(flavour, &model);
    }
    let behaviour_model = match model
        .strip_prefix("stub-rate-limited-")
        .and_then(|n| n.parse::<u64>().ok())
    {
        Some(first) => {
            let mut limited = lock(&shared.limited);
            let seen = limited.entry(model.clone()).or_insert(0);
            *seen += 1;
            if *seen <= first {
                return rate_limited(flavour, &model);
            }
            STUB_ECHO_MODEL
        }
        None => model.as_str(),
    };
    if behaviour_model == STUB_REFUSAL_MODEL {
        return refusal(flavour, &model, prompt_tokens);
    }
    let tools = request["tools"].as_array().filter(|tools| !tools.is_empty());
    let last_is_tool = messages.last().is_some_and(|m| m["role"] == "tool");
    if let Some(tools) = tools
        && (behaviour_model == STUB_TOOLS_FOREVER_MODEL || (behaviour_model == STUB_TOOLS_MODEL && !last_is_tool))
    {
        return tool_call(flavour, &model, messages, &tools[0], prompt_tokens);
    }
    let text = match behaviour_model {
        STUB_ECHO_MODEL => echo(messages, &model),
        STUB_TOOLS_MODEL | STUB_TOOLS_FOREVER_MODEL => tool_answer(messages),
        _ => classify(messages),
    };
    let text = match &request["response_format"] {
        format if format["type"] == "json_schema" => shaped(&format["json_schema"]["schema"], &text),
        _ => text,
    };
    let (content, completion_tokens, finish_reason) = match max_tokens {
        Some(max) if tokens(text.len()) > max => {
            let mut end = (max as usize * 4).min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            (text[..end].to_string(), max, "length")
        }
        _ => (text.clone(), tokens(text.len()), "stop"),
    };
    let mut message = json!({"role": "assistant", "content": content});
    if flavour == Flavour::OpenAi {
        message["refusal"] = Value::Null;
    }
    completion(
        flavour,
        &model,
        message,
        finish_reason,
        prompt_tokens,
        completion_tokens,
        false,
    )
}

/// About four characters a token, at least one.
fn tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4).max(1)
}

fn unauthorized(options: &StubModelOptions, flavour: Flavour, headers: &HeaderMap) -> Option<Response> {
    let wanted = options.api_key.as_deref()?;
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let given = match flavour {
        Flavour::OpenAi => header("authorization").and_then(|value| value.strip_prefix("Bearer ")),
        Flavour::Azure => header("api-key"),
    };
    if given == Some(wanted) {
        return None;
    }
    Some(match flavour {
        Flavour::OpenAi => provider_error(
            flavour,
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
        ),
        Flavour::Azure => provider_error(
            flavour,
            StatusCode::UNAUTHORIZED,
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key \
             for an active subscription and use a correct regional API endpoint for your resource.",
        ),
    })
}

/// A provider's error answer: OpenAI `{"error": {"message", "type",
/// "param", "code"}}`, Azure `{"error": {"code", "message"}}`.
fn provider_error(flavour: Flavour, status: StatusCode, code: &str, message: &str) -> Response {
    let body = match flavour {
        Flavour::OpenAi => json!({"error": {"message": message, "type": code, "param": null, "code": code}}),
        Flavour::Azure => json!({"error": {"code": code, "message": message}}),
    };
    (status, Json(body)).into_response()
}

fn rate_limited(flavour: Flavour, model: &str) -> Response {
    let (body, headers): (Value, Vec<(&str, &str)>) = match flavour {
        Flavour::OpenAi => (
            json!({"error": {
                "message": format!("Rate limit reached for {model} on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 1s."),
                "type": "requests",
                "param": null,
                "code": "rate_limit_exceeded",
            }}),
            vec![
                ("retry-after", "1"),
                ("x-ratelimit-limit-requests", "3"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "1s"),
            ],
        ),
        Flavour::Azure => (
            json!({"error": {
                "code": "429",
                "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-06-01 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 1 second.",
            }}),
            vec![
                ("retry-after", "1"),
                ("retry-after-ms", "1000"),
                ("x-ratelimit-remaining-requests", "0"),
            ],
        ),
    };
    let mut response = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
    for (name, value) in headers {
        response
            .headers_mut()
            .insert(name, axum::http::HeaderValue::from_static(value));
    }
    response
}

fn refusal(flavour: Flavour, model: &str, prompt_tokens: u64) -> Response {
    match flavour {
        Flavour::OpenAi => {
            let text = "I'm sorry, but I can't help with that request.";
            let message = json!({"role": "assistant", "content": null, "refusal": text});
            completion(
                flavour,
                model,
                message,
                "stop",
                prompt_tokens,
                tokens(text.len()),
                false,
            )
        }
        Flavour::Azure => {
            let message = json!({"role": "assistant", "content": null});
            completion(flavour, model, message, "content_filter", prompt_tokens, 1, true)
        }
    }
}

/// Azure's content-filter verdicts: nothing filtered, or (for a refusal)
/// violence filtered at high severity.
fn filter_results(filtered: bool) -> Value {
    let safe = json!({"filtered": false, "severity": "safe"});
    let violence = if filtered {
        json!({"filtered": true, "severity": "high"})
    } else {
        safe.clone()
    };
    json!({"hate": safe, "self_harm": safe, "sexual": safe, "violence": violence})
}

/// A chat completion in the provider's shape.
fn completion(
    flavour: Flavour,
    model: &str,
    message: Value,
    finish_reason: &str,
    prompt_tokens: u64,
    completion_tokens: u64,
    filtered: bool,
) -> Response {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let mut choice = json!({"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason});
    let mut body = json!({
        "id": format!("chatcmpl-stub{created}"),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_stub",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    });
    if flavour == Flavour::Azure {
        choice["content_filter_results"] = filter_results(filtered);
        body["prompt_filter_results"] = json!([{"prompt_index": 0, "content_filter_results": filter_results(false)}]);
    }
    body["choices"] = json!([choice]);
    (StatusCode::OK, Json(body)).into_response()
}

/// The model asks for `tool` (the first offered), with arguments made
/// from its schema.
fn tool_call(flavour: Flavour, model: &str, messages: &[Value], tool: &Value, prompt_tokens: u64) -> Response {
    let turn = messages.iter().filter(|m| m["role"] == "assistant").count() + 1;
    let input = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default();
    let function = &tool["function"];
    let mut arguments = serde_json::Map::new();
    if let Some(properties) = function["parameters"]["properties"].as_object() {
        for (name, property) in properties {
            let value = match property["type"].as_str() {
                Some("number" | "integer") => json!(1),
                Some("boolean") => json!(true),
                Some("array") => json!([]),
                Some("object") => json!({}),
                _ => json!(input),
            };
            arguments.insert(name.clone(), value);
        }
    }
    let arguments = Value::Object(arguments).to_string();
    let call = json!({
        "id": format!("call_{turn}"),
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    });
    let mut message = json!({"role": "assistant", "content": null, "tool_calls": [call]});
    if flavour == Flavour::OpenAi {
        message["refusal"] = Value::Null;
    }
    let completion_tokens = tokens(call.to_string().len());
    completion(
        flavour,
        model,
        message,
        "tool_calls",
        prompt_tokens,
        completion_tokens,
        false,
    )
}

/// `stub-tools` once the tools answered: the tool results it was given.
fn tool_answer(messages: &[Value]) -> String {
    let results: Vec<Value> = messages
        .iter()
        .filter(|m| m["role"] == "tool")
        .filter_map(|m| m["content"].as_str())
        .map(|text| serde_json::from_str(text).unwrap_or_else(|_| json!(text)))
        .collect();
    json!({"answer": "done", "toolResults": results}).to_string()
}

/// An answer shaped by a JSON Schema: each property of the schema, with
/// the behaviour's own value of that name where `natural` (its answer,
/// when it is a JSON object) has one, else a value of the property's type.
fn shaped(schema: &Value, natural: &str) -> String {
    let natural: Value = serde_json::from_str(natural).unwrap_or_default();
    let Some(properties) = schema["properties"].as_object() else {
        return natural.to_string();
    };
    let mut answer = serde_json::Map::new();
    for (name, property) in properties {
        let value = match natural.get(name) {
            Some(value) => value.clone(),
            None => match (property["enum"].as_array(), property["type"].as_str()) {
                (Some(values), _) if !values.is_empty() => values[0].clone(),
                (_, Some("number" | "integer")) => json!(0),
                (_, Some("boolean")) => json!(false),
                (_, Some("array")) => json!([]),
                (_, Some("object")) => json!({}),
                _ => json!(""),
            },
        };
        answer.insert(name.clone(), value);
    }
    Value::Object(answer).to_string()
}

/// `stub-echo`: the instructions (system messages) and the input (the
/// last user message), as one JSON object.
fn echo(messages: &[Value], model: &str) -> String {
    let system: Vec<&str> = messages
        .iter()
        .filter(|m| m["role"] == "system" || m["role"] == "developer")
        .filter_map(|m| m["content"].as_str())
        .collect();
    let input = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default();
    json!({"instructions": system.join("\n"), "input": input, "model": model}).to_string()
}

/// The invoice classifier: the last user message read as an invoice.
fn classify(messages: &[Value]) -> String {
    let invoice: Value = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default();
    let vendor = invoice["vendor"].as_str().unwrap_or("Unknown vendor");
    let lower = vendor.to_lowercase();
    let (category, route) = RULES
        .iter()
        .find(|(keyword, ..)| lower.contains(keyword))
        .map_or(("Other", "General Accounts Payable"), |(_, c, r)| (*c, *r));
    json!({
        "vendorName": vendor,
        "vendorCategory": category,
        "invoiceNumber": invoice["number"].as_str().unwrap_or("unknown"),
        "invoiceDate": invoice["date"].as_str().unwrap_or("2026-11-01"),
        "totalAmount": invoice["amount"].as_f64().unwrap_or(0.0),
        "currency": invoice["currency"].as_str().unwrap_or("EUR"),
        "routingDestination": route,
        "confidence": 0.9,
    })
    .to_string()
}

impl std::fmt::Debug for StubModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StubModel")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}
