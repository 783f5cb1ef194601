//! An LLM agent with a tool, on the agent world 0.2.0: the model may call
//! `lookup_vendor`, which this agent serves by posting the call's
//! arguments to an HTTP API through `wasi:http` (so the node's egress
//! policy decides whether it may), and hands the answer back; the loop
//! ends when the model answers, when the turns run out, or when the
//! node says the run's token budget is spent.
//!
//! Input: `input_ref["message"]`, the question; `input_ref["tool_url"]`,
//! the API the tool posts to; `input_ref["max_turns"]`, the most model
//! calls (default 6). A request the node denies (a host not allowed)
//! becomes the tool's result, `{"error": "..."}`, so the model is told
//! and can answer without it.
//!
//! Result keys: `answer` (the model's last text), `turns` (model calls
//! made), `tool_calls` (tools called), `tool_errors` (of which failed).

wit_bindgen::generate!({ world: "agent", path: "../../wit/v0.2", generate_all });

use node_runtime::agent::llm::{self, ChatRequest, LlmError, Message, Role, Tool, ToolCall};
use node_runtime::agent::log::{self, Level};
use wasi::http::outgoing_handler;
use wasi::http::types::{Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme};
use wasi::io::streams::StreamError;

/// Model calls at most, unless the input says otherwise.
const DEFAULT_TURNS: u32 = 6;
/// The most of a tool's answer handed to the model.
const MAX_TOOL_RESULT: usize = 16 * 1024;

struct ToolLoop;

impl Guest for ToolLoop {
    fn run(context: RunContext) -> Result<StringMap, AgentError> {
        let input = |key: &str| {
            context
                .input_ref
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let fail = |message: String| AgentError {
            message,
            retryable: false,
        };
        let question = input("message").ok_or_else(|| fail("input_ref[\"message\"] is missing".into()))?;
        let tool_url = input("tool_url").ok_or_else(|| fail("input_ref[\"tool_url\"] is missing".into()))?;
        let max_turns = input("max_turns").and_then(|n| n.parse().ok()).unwrap_or(DEFAULT_TURNS);
        let tools = vec![Tool {
            name: "lookup_vendor".into(),
            description: "Looks a vendor up in the vendor registry: its category and the department that pays it."
                .into(),
            parameters: r#"{"type": "object", "properties": {"vendor": {"type": "string", "description": "The vendor's name"}}, "required": ["vendor"]}"#.into(),
        }];
        let mut messages = vec![
            text(
                Role::System,
                "You route invoices. Call lookup_vendor to learn about a vendor before you answer.",
            ),
            text(Role::User, &question),
        ];
        let (mut calls, mut errors) = (0u32, 0u32);
        for turn in 1..=max_turns {
            let answer = llm::chat(&ChatRequest {
                model: None,
                messages: messages.clone(),
                max_tokens: Some(300),
                temperature: Some(0.0),
                tools: tools.clone(),
                response_format: None,
            })
            .map_err(|err| match err {
                LlmError::BudgetExhausted(why) => fail(format!(
                    "the run's LLM token budget ran out after {} model calls and {calls} tool calls: {why}",
                    turn - 1
                )),
                other => AgentError {
                    message: format!("the model call failed: {other:?}"),
                    retryable: matches!(other, LlmError::Timeout(_) | LlmError::Provider(_)),
                },
            })?;
            if answer.tool_calls.is_empty() {
                return Ok(vec![
                    ("answer".into(), answer.content),
                    ("turns".into(), turn.to_string()),
                    ("tool_calls".into(), calls.to_string()),
                    ("tool_errors".into(), errors.to_string()),
                ]);
            }
            messages.push(Message {
                role: Role::Assistant,
                content: answer.content.clone(),
                tool_calls: answer.tool_calls.clone(),
                tool_call_id: None,
            });
            for call in &answer.tool_calls {
                calls += 1;
                let result = match call_tool(call, &tool_url) {
                    Ok(body) => body,
                    Err(why) => {
                        errors += 1;
                        log::log(Level::Warn, "a tool call failed", &[("error".into(), why.clone())]);
                        serde_json::json!({ "error": why }).to_string()
                    }
                };
                messages.push(Message {
                    role: Role::Tool,
                    content: result,
                    tool_calls: Vec::new(),
                    tool_call_id: Some(call.id.clone()),
                });
            }
        }
        Err(fail(format!(
            "the model was still calling tools after {max_turns} turns ({calls} tool calls); giving up"
        )))
    }
}

fn text(role: Role, content: &str) -> Message {
    Message {
        role,
        content: content.to_string(),
        tool_calls: Vec::new(),
        tool_call_id: None,
    }
}

/// Serves one tool call: its arguments posted to the API.
fn call_tool(call: &ToolCall, url: &str) -> Result<String, String> {
    if call.name != "lookup_vendor" {
        return Err(format!("there is no tool named {:?}", call.name));
    }
    if serde_json::from_str::<serde_json::Value>(&call.arguments).is_err() {
        return Err("the arguments are not JSON".to_string());
    }
    post(url, &call.arguments)
}

/// POSTs `body` to `url`; the answer's body, or why there is none.
fn post(url: &str, body: &str) -> Result<String, String> {
    let (scheme, rest) = match url.split_once("://") {
        Some(("http", rest)) => (Scheme::Http, rest),
        Some(("https", rest)) => (Scheme::Https, rest),
        _ => return Err(format!("{url:?} is not an http:// or https:// URL")),
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let headers = Fields::from_list(&[("content-type".to_string(), b"application/json".to_vec())])
        .map_err(|err| format!("bad header: {err:?}"))?;
    let request = OutgoingRequest::new(headers);
    let _ = request.set_method(&Method::Post);
    let _ = request.set_scheme(Some(&scheme));
    let _ = request.set_authority(Some(authority));
    let _ = request.set_path_with_query(Some(path));
    let outgoing = request
        .body()
        .map_err(|()| "the request body was already taken".to_string())?;
    let pending = outgoing_handler::handle(request, Some(RequestOptions::new()))
        .map_err(|code| format!("the node refused the request: {code:?}"))?;
    // A request the node refuses fails its body's stream first; the
    // reason is the response's error, read below.
    let written = match outgoing.write() {
        Ok(stream) => {
            let written = stream.blocking_write_and_flush(body.as_bytes());
            drop(stream);
            written.map_err(|err| format!("writing the body: {err:?}"))
        }
        Err(()) => Err("cannot write the body".to_string()),
    };
    let _ = OutgoingBody::finish(outgoing, None);
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => return Err(format!("the request failed: {code:?}")),
        _ => return Err(written.err().unwrap_or_else(|| "no response".to_string())),
    };
    written?;
    let status = response.status();
    let incoming = response
        .consume()
        .map_err(|()| "the body was already taken".to_string())?;
    let mut bytes = Vec::new();
    {
        let stream = incoming
            .stream()
            .map_err(|()| "the body stream was already taken".to_string())?;
        while bytes.len() < MAX_TOOL_RESULT {
            match stream.blocking_read(16 * 1024) {
                Ok(chunk) => bytes.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(_)) => return Err("the answer was cut off".to_string()),
            }
        }
    }
    let _ = IncomingBody::finish(incoming);
    bytes.truncate(MAX_TOOL_RESULT);
    let body = String::from_utf8_lossy(&bytes).into_owned();
    if !(200..300).contains(&status) {
        return Err(format!("the vendor registry answered {status}: {body}"));
    }
    Ok(body)
}

export!(ToolLoop);
