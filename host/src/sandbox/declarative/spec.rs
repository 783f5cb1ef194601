//! A declarative agent's definition, in the reference platform's format,
//! read into what the built-in agent needs.
//!
//! The control plane answers `GET /v1/agents/{agentId}/versions/{version}`
//! with `{"agentId", "version", "spec", "createdAt"}`; `run-agent --spec`
//! reads a file holding either that document or the bare spec. The spec is
//! camelCase: `name`, `description`, `instructions`, `modelProfile`
//! (`model`, `temperature`, `maxTokens`), `budget` (`maxTokens`,
//! `maxDurationSeconds`), `tools`, `input` and `output` (`type`,
//! `config`) and `metadata`. Unknown fields are ignored, as the reference
//! ignores them; a field this node uses with the wrong type is an error
//! naming the field. `input` belongs to the control plane (it feeds runs)
//! and is not read here.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Map, Value};
use thiserror::Error;

/// The tool that lets an agent deliver through its output connector.
pub const HTTP_POST_TOOL: &str = "http-post";

/// The largest definition the node reads (the control plane's answer or
/// a `--spec` file).
pub const SPEC_BYTES: usize = 1024 * 1024;

/// A definition that cannot be run as written.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

/// A declarative agent, as this node runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSpec {
    /// From the version document, when the spec came in one.
    pub agent_id: Option<String>,
    pub version: Option<String>,
    pub name: String,
    pub instructions: String,
    /// `modelProfile.model`: `None` leaves the node's default.
    pub model: Option<String>,
    /// `modelProfile.temperature`.
    pub temperature: Option<f32>,
    /// `modelProfile.maxTokens`: the answer's cap, per call.
    pub max_output_tokens: Option<u32>,
    /// `budget.maxTokens`: the run's token budget.
    pub budget_tokens: Option<u32>,
    /// `budget.maxDurationSeconds`: the run's wall-clock budget.
    pub budget_duration: Option<Duration>,
    pub tools: BTreeSet<String>,
    /// `output`; `None` when the spec has none (the run only returns its
    /// result).
    pub output: Option<Output>,
}

/// Where the agent's answer goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Http(HttpOutput),
    /// A connector type this node cannot deliver through (service-bus,
    /// kafka, storage, sql): such a spec is refused before anything runs.
    Unsupported(String),
}

/// The reference's `Http` output connector's configuration. Values keep
/// their `${NAME}` placeholders; they are resolved per run from the
/// operator's secrets (`secrets.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpOutput {
    pub endpoint: String,
    pub method: http::Method,
    /// In the order given; names as written.
    pub headers: Vec<(String, String)>,
    /// Per attempt.
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// `{RunId}` and `{MessageId}` are replaced; `None` sends no
    /// `Idempotency-Key`.
    pub idempotency_key_format: Option<String>,
}

/// `retryPolicy`: how often and how patiently a failed POST is repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub retry_delay: Duration,
    pub exponential: bool,
    pub max_retry_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            retry_delay: Duration::from_millis(1000),
            exponential: true,
            max_retry_delay: Duration::from_secs(30),
        }
    }
}

/// The most retries a spec may ask for: each is a POST the target sees.
pub const MAX_RETRIES: u32 = 10;

/// The most headers an output may set, and the most bytes of names and
/// values together.
pub const MAX_HEADERS: usize = 64;
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Headers a spec may not set (and any `Proxy-*`, `X-Forwarded-*` and
/// `X-HTTP-Method*`): the request's framing and routing, which the node
/// decides (`Host` would route a secret bound to one virtual
/// host to another behind the same address), and the ones the node sets
/// itself on every attempt.
const RESERVED_HEADERS: [&str; 15] = [
    "host",
    "forwarded",
    "expect",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "content-encoding",
    "x-original-url",
    "idempotency-key",
    "x-correlation-id",
    "traceparent",
];

/// The default per-attempt timeout of the HTTP output.
pub const DEFAULT_OUTPUT_TIMEOUT: Duration = Duration::from_secs(30);

impl AgentSpec {
    /// Reads a version document (`{"agentId", "version", "spec", ...}`) or
    /// a bare spec.
    pub fn parse(bytes: &[u8]) -> Result<AgentSpec, InvalidSpec> {
        if bytes.len() > SPEC_BYTES {
            return Err(InvalidSpec(format!(
                "the definition is {} bytes, more than the {SPEC_BYTES} this node reads",
                bytes.len()
            )));
        }
        let value: Value =
            serde_json::from_slice(bytes).map_err(|err| InvalidSpec(format!("the definition is not JSON: {err}")))?;
        let Value::Object(top) = value else {
            return Err(InvalidSpec("the definition is not a JSON object".into()));
        };
        match top.get("spec") {
            Some(Value::Object(spec)) => {
                let mut parsed = AgentSpec::from_object(spec)?;
                parsed.agent_id = optional_string(&top, "agentId", "")?;
                parsed.version = optional_string(&top, "version", "")?;
                Ok(parsed)
            }
            Some(_) => Err(InvalidSpec("`spec` must be an object (the agent's definition)".into())),
            None => {
                let mut parsed = AgentSpec::from_object(&top)?;
                parsed.agent_id = optional_string(&top, "agentId", "")?;
                parsed.version = optional_string(&top, "version", "")?;
                Ok(parsed)
            }
        }
    }

    fn from_object(spec: &Map<String, Value>) -> Result<AgentSpec, InvalidSpec> {
        let name = required_string(spec, "name")?;
        let instructions = required_string(spec, "instructions")?;
        let profile = optional_object(spec, "modelProfile")?;
        let (model, temperature, max_output_tokens) = match profile {
            None => (None, None, None),
            Some(profile) => {
                let model = optional_string(profile, "model", "modelProfile.")?.filter(|m| !m.trim().is_empty());
                let temperature = match profile.get("temperature") {
                    None | Some(Value::Null) => None,
                    Some(value) => Some(
                        value
                            .as_f64()
                            .filter(|t| t.is_finite() && *t >= 0.0 && *t <= 2.0)
                            .ok_or_else(|| {
                                InvalidSpec(format!(
                                    "modelProfile.temperature must be a number from 0 to 2, not {value}"
                                ))
                            })? as f32,
                    ),
                };
                let max_tokens = optional_count(profile, "maxTokens", "modelProfile.", 1..=128_000)?;
                (model, temperature, max_tokens)
            }
        };
        let (budget_tokens, budget_duration) = match optional_object(spec, "budget")? {
            None => (None, None),
            Some(budget) => (
                optional_count(budget, "maxTokens", "budget.", 1..=128_000)?,
                optional_count(budget, "maxDurationSeconds", "budget.", 1..=3600)?
                    .map(|seconds| Duration::from_secs(u64::from(seconds))),
            ),
        };
        let tools = tools(spec)?;
        let output = match optional_object(spec, "output")? {
            None => None,
            Some(output) => Some(parse_output(output)?),
        };
        Ok(AgentSpec {
            agent_id: None,
            version: None,
            name,
            instructions,
            model,
            temperature,
            max_output_tokens,
            budget_tokens,
            budget_duration,
            tools,
            output,
        })
    }

    /// The name the spec calls itself by, with its version when known.
    pub fn describe(&self) -> String {
        match (&self.agent_id, &self.version) {
            (Some(id), Some(version)) => format!("agent {id} version {version} (\"{}\")", self.name),
            _ => format!("agent \"{}\"", self.name),
        }
    }
}

/// A connector type, as the reference's validator compares them
/// (lower-cased), with its definition files' spellings (`ServiceBus`,
/// `Http`) taken as the same types.
fn connector_type(raw: &str) -> String {
    match raw.trim().to_ascii_lowercase().as_str() {
        "servicebus" => "service-bus".to_string(),
        other => other.to_string(),
    }
}

fn parse_output(output: &Map<String, Value>) -> Result<Output, InvalidSpec> {
    let kind = required_string(output, "type")
        .map_err(|_| InvalidSpec("output.type is required: the connector's type, e.g. \"Http\"".to_string()))?;
    if connector_type(&kind) != "http" {
        return Ok(Output::Unsupported(kind));
    }
    let empty = Map::new();
    let config = optional_object(output, "config")?.unwrap_or(&empty);
    let at = "output.config.";
    let endpoint = required_string(config, "endpoint").map_err(|_| {
        InvalidSpec(format!(
            "{at}endpoint is required for an Http output: the URL to post to"
        ))
    })?;
    let method = match optional_string(config, "method", at)? {
        None => http::Method::POST,
        Some(method) => {
            let upper = method.trim().to_ascii_uppercase();
            match upper.as_str() {
                "POST" | "PUT" | "PATCH" => http::Method::from_bytes(upper.as_bytes()).expect("a valid method"),
                _ => {
                    return Err(InvalidSpec(format!(
                        "{at}method {method:?} cannot carry the agent's output: use POST, PUT or PATCH"
                    )));
                }
            }
        }
    };
    let headers: Vec<(String, String)> = match config.get("headers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(headers)) => {
            if headers.len() > MAX_HEADERS {
                return Err(InvalidSpec(format!(
                    "{at}headers has {} entries, more than the {MAX_HEADERS} an output may set",
                    headers.len()
                )));
            }
            headers
                .iter()
                .map(|(name, value)| match value {
                    Value::String(value) => Ok((name.clone(), value.clone())),
                    other => Err(InvalidSpec(format!("{at}headers.{name} must be a string, not {other}"))),
                })
                .collect::<Result<_, _>>()?
        }
        Some(other) => {
            return Err(InvalidSpec(format!(
                "{at}headers must be an object of header names to values, not {other}"
            )));
        }
    };
    let bytes: usize = headers.iter().map(|(name, value)| name.len() + value.len()).sum();
    if bytes > MAX_HEADER_BYTES {
        return Err(InvalidSpec(format!(
            "{at}headers take {bytes} bytes, more than the {MAX_HEADER_BYTES} an output may set"
        )));
    }
    let mut seen: Vec<String> = Vec::with_capacity(headers.len());
    for (name, _) in &headers {
        let lower = name.to_ascii_lowercase();
        if RESERVED_HEADERS.contains(&lower.as_str())
            || lower.starts_with("proxy-")
            || lower.starts_with("x-forwarded-")
            || lower.starts_with("x-http-method")
        {
            return Err(InvalidSpec(format!(
                "{at}headers.{name}: the node sets this header itself (framing, routing, or the \
                 connector's own headers); remove it"
            )));
        }
        if seen.contains(&lower) {
            return Err(InvalidSpec(format!(
                "{at}headers names {name:?} twice (header names ignore case)"
            )));
        }
        seen.push(lower);
    }
    if output
        .get("config")
        .and_then(|c| c.get("endpoint"))
        .and_then(Value::as_str)
        .is_some_and(authority_has_placeholder)
    {
        return Err(InvalidSpec(format!(
            "{at}endpoint has a ${{NAME}} placeholder in its scheme, host or port: placeholders may \
             stand in the path, the query and header values only, so the host the operator allowed \
             is the host written"
        )));
    }
    let timeout = optional_count(config, "timeoutSeconds", at, 1..=600)?
        .map_or(DEFAULT_OUTPUT_TIMEOUT, |s| Duration::from_secs(u64::from(s)));
    let retry = match optional_object(config, "retryPolicy")? {
        None => RetryPolicy::default(),
        Some(policy) => {
            let at = "output.config.retryPolicy.";
            let defaults = RetryPolicy::default();
            RetryPolicy {
                max_retries: optional_count(policy, "maxRetries", at, 0..=MAX_RETRIES)?.unwrap_or(defaults.max_retries),
                retry_delay: optional_count(policy, "retryDelayMs", at, 0..=600_000)?
                    .map_or(defaults.retry_delay, |ms| Duration::from_millis(u64::from(ms))),
                exponential: match policy.get("useExponentialBackoff") {
                    None | Some(Value::Null) => defaults.exponential,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        return Err(InvalidSpec(format!(
                            "{at}useExponentialBackoff must be true or false, not {other}"
                        )));
                    }
                },
                max_retry_delay: optional_count(policy, "maxRetryDelayMs", at, 0..=3_600_000)?
                    .map_or(defaults.max_retry_delay, |ms| Duration::from_millis(u64::from(ms))),
            }
        }
    };
    let idempotency_key_format = optional_string(config, "idempotencyKeyFormat", at)?.filter(|f| !f.is_empty());
    Ok(Output::Http(HttpOutput {
        endpoint,
        method,
        headers,
        timeout,
        retry,
        idempotency_key_format,
    }))
}

/// Whether `${` appears before the endpoint's path, query or fragment.
fn authority_has_placeholder(endpoint: &str) -> bool {
    let after_scheme = endpoint.split_once("://").map_or(endpoint, |(_, rest)| rest);
    let authority_end = after_scheme.find(['/', '?', '#']).unwrap_or(after_scheme.len());
    endpoint
        .split_once("://")
        .is_some_and(|(scheme, _)| scheme.contains("${"))
        || after_scheme[..authority_end].contains("${")
}

fn tools(spec: &Map<String, Value>) -> Result<BTreeSet<String>, InvalidSpec> {
    let list = match spec.get("tools") {
        None | Some(Value::Null) => return Ok(BTreeSet::new()),
        Some(Value::Array(list)) => list,
        Some(other) => return Err(InvalidSpec(format!("tools must be a list of names, not {other}"))),
    };
    let mut tools = BTreeSet::new();
    for tool in list {
        let name = tool
            .as_str()
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .ok_or_else(|| InvalidSpec(format!("tools: {tool} is not a tool name")))?;
        if !tools.insert(name.to_string()) {
            return Err(InvalidSpec(format!("tools: {name:?} is listed twice")));
        }
    }
    Ok(tools)
}

fn required_string(object: &Map<String, Value>, key: &str) -> Result<String, InvalidSpec> {
    match object.get(key) {
        Some(Value::String(text)) if !text.trim().is_empty() => Ok(text.clone()),
        Some(Value::String(_)) | None | Some(Value::Null) => Err(InvalidSpec(format!("{key} is required"))),
        Some(other) => Err(InvalidSpec(format!("{key} must be a string, not {other}"))),
    }
}

fn optional_string(object: &Map<String, Value>, key: &str, at: &str) -> Result<Option<String>, InvalidSpec> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(other) => Err(InvalidSpec(format!("{at}{key} must be a string, not {other}"))),
    }
}

fn optional_object<'a>(
    object: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a Map<String, Value>>, InvalidSpec> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(inner)) => Ok(Some(inner)),
        Some(other) => Err(InvalidSpec(format!("{key} must be an object, not {other}"))),
    }
}

fn optional_count(
    object: &Map<String, Value>,
    key: &str,
    at: &str,
    range: std::ops::RangeInclusive<u32>,
) -> Result<Option<u32>, InvalidSpec> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| range.contains(n))
            .map(Some)
            .ok_or_else(|| {
                InvalidSpec(format!(
                    "{at}{key} must be a whole number from {} to {}, not {value}",
                    range.start(),
                    range.end()
                ))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VERSION: &str = r#"{
        "agentId": "4f6c", "version": "1.2.0", "createdAt": "2026-12-01T00:00:00Z",
        "spec": {
            "name": "Invoice classifier", "description": "d", "instructions": "Classify.",
            "modelProfile": {"model": "gpt-4o-mini", "temperature": 0.2, "maxTokens": 500},
            "budget": {"maxTokens": 2000, "maxDurationSeconds": 30},
            "tools": ["http-post"],
            "input": {"type": "ServiceBus", "config": {"queue": "invoices"}},
            "output": {"type": "Http", "config": {
                "endpoint": "https://erp.example.com/invoices", "method": "post",
                "headers": {"Authorization": "Bearer ${ERP_TOKEN}"},
                "timeoutSeconds": 10,
                "retryPolicy": {"maxRetries": 2, "retryDelayMs": 100, "useExponentialBackoff": false, "maxRetryDelayMs": 500},
                "idempotencyKeyFormat": "{RunId}-{MessageId}"}},
            "metadata": {"team": "finance"}
        }}"#;

    #[test]
    fn a_version_document_in_the_reference_format_reads_whole() {
        let spec = AgentSpec::parse(VERSION.as_bytes()).unwrap();
        assert_eq!(spec.agent_id.as_deref(), Some("4f6c"));
        assert_eq!(spec.version.as_deref(), Some("1.2.0"));
        assert_eq!(spec.instructions, "Classify.");
        assert_eq!(spec.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(spec.temperature, Some(0.2));
        assert_eq!(spec.max_output_tokens, Some(500));
        assert_eq!(spec.budget_tokens, Some(2000));
        assert_eq!(spec.budget_duration, Some(Duration::from_secs(30)));
        assert!(spec.tools.contains(HTTP_POST_TOOL));
        let Some(Output::Http(output)) = spec.output else {
            panic!("an Http output")
        };
        assert_eq!(output.method, http::Method::POST);
        assert_eq!(
            output.headers,
            vec![("Authorization".into(), "Bearer ${ERP_TOKEN}".into())]
        );
        assert_eq!(output.timeout, Duration::from_secs(10));
        assert_eq!(
            output.retry,
            RetryPolicy {
                max_retries: 2,
                retry_delay: Duration::from_millis(100),
                exponential: false,
                max_retry_delay: Duration::from_millis(500)
            }
        );
        assert_eq!(output.idempotency_key_format.as_deref(), Some("{RunId}-{MessageId}"));
    }

    #[test]
    fn headers_are_bounded_in_count_and_bytes_and_placeholders_may_stand_in_the_path() {
        let headers: serde_json::Map<String, Value> = (0..=MAX_HEADERS)
            .map(|n| (format!("h{n}"), Value::String(String::new())))
            .collect();
        let spec = serde_json::json!({"name": "n", "instructions": "i",
            "output": {"type": "Http", "config": {"endpoint": "http://h/", "headers": headers}}});
        let err = AgentSpec::parse(spec.to_string().as_bytes()).unwrap_err();
        assert!(err.0.contains("more than the 64"), "{err}");
        let spec = serde_json::json!({"name": "n", "instructions": "i",
            "output": {"type": "Http", "config": {"endpoint": "http://h/", "headers": {"A": "x".repeat(MAX_HEADER_BYTES)}}}});
        let err = AgentSpec::parse(spec.to_string().as_bytes()).unwrap_err();
        assert!(err.0.contains("bytes"), "{err}");
        let spec = br#"{"name": "n", "instructions": "i", "output": {"type": "Http", "config": {"endpoint": "https://h.example/hook/${T}?k=${T}"}}}"#;
        assert!(AgentSpec::parse(spec).is_ok());
    }

    #[test]
    fn a_bare_spec_reads_too_and_other_connectors_are_named_not_run() {
        let spec =
            AgentSpec::parse(br#"{"name": "n", "instructions": "i", "output": {"type": "ServiceBus", "config": {}}}"#)
                .unwrap();
        assert_eq!(spec.agent_id, None);
        assert_eq!(spec.output, Some(Output::Unsupported("ServiceBus".into())));
        assert_eq!(spec.budget_tokens, None);
    }

    #[test]
    fn each_wrong_field_is_named() {
        for (bad, says) in [
            (r#"{"instructions": "i"}"#, "name is required"),
            (r#"{"name": "n"}"#, "instructions is required"),
            (
                r#"{"name": "n", "instructions": "i", "budget": {"maxTokens": 0}}"#,
                "budget.maxTokens",
            ),
            (
                r#"{"name": "n", "instructions": "i", "budget": {"maxDurationSeconds": 3601}}"#,
                "budget.maxDurationSeconds",
            ),
            (
                r#"{"name": "n", "instructions": "i", "modelProfile": {"temperature": "hot"}}"#,
                "modelProfile.temperature",
            ),
            (
                r#"{"name": "n", "instructions": "i", "tools": ["a", "a"]}"#,
                "listed twice",
            ),
            (
                r#"{"name": "n", "instructions": "i", "tools": [""]}"#,
                "not a tool name",
            ),
            (
                r#"{"name": "n", "instructions": "i", "output": {"type": "Http", "config": {}}}"#,
                "endpoint is required",
            ),
            (
                r#"{"name": "n", "instructions": "i", "output": {"type": "Http", "config": {"endpoint": "x", "method": "GET"}}}"#,
                "method",
            ),
            (
                r#"{"name": "n", "instructions": "i", "output": {"type": "Http", "config": {"endpoint": "x", "retryPolicy": {"maxRetries": 11}}}}"#,
                "maxRetries",
            ),
            (
                r#"{"name": "n", "instructions": "i", "output": {"type": "Http", "config": {"endpoint": "x", "headers": {"A": 1}}}}"#,
                "headers.A",
            ),
            (r#"[1]"#, "not a JSON object"),
            (r#"{"spec": 1}"#, "`spec` must be an object"),
            (
                r#"{"name": "n", "instructions": "i", "output": {"type": "Http", "config": {"endpoint": "http://${T}.evil/"}}}"#,
                "placeholder in its scheme, host or port",
            ),
            (
                r#"{"name": "n", "instructions": "i", "output": {"type": "Http", "config": {"endpoint": "http://h:${P}/"}}}"#,
                "placeholder in its scheme, host or port",
            ),
            (
                r#"{"name": "n", "instructions": "i", "output": {"type": "Http", "config": {"endpoint": "x", "headers": {"Host": "evil"}}}}"#,
                "sets this header itself",
            ),
            (
                r#"{"name": "n", "instructions": "i", "output": {"type": "Http", "config": {"endpoint": "x", "headers": {"Content-Length": "0"}}}}"#,
                "sets this header itself",
            ),
            (
                r#"{"name": "n", "instructions": "i", "output": {"type": "Http", "config": {"endpoint": "x", "headers": {"A": "1", "a": "2"}}}}"#,
                "twice",
            ),
        ] {
            let err = AgentSpec::parse(bad.as_bytes()).unwrap_err();
            assert!(err.0.contains(says), "{bad}: {err}");
        }
    }
}
