//! An LLM agent with a tool, on the agent world 0.2.0: the model may call
//! `lookup_vendor`, which this agent serves by posting the call's
//! arguments to an HTTP API through `wasi:http` (so the node's egress
//! policy decides whether it may), and hands the answer back; the loop
//! ends when the model answers, when the turns run out, or when the
//! node says the run's token budget is spent. Written with the Rust SDK
//! (`kit/rust/sdk`): its `llm` helpers and its HTTP client.
//!
//! Input: `input_ref["message"]`, the question; `input_ref["tool_url"]`,
//! the API the tool posts to; `input_ref["max_turns"]`, the most model
//! calls (default 6). A request the node denies (a host not allowed)
//! becomes the tool's result, `{"error": "..."}`, so the model is told
//! and can answer without it.
//!
//! Result keys: `answer` (the model's last text), `turns` (model calls
//! made), `tool_calls` (tools called), `tool_errors` (of which failed).

use node_runtime_agent::bindings::wasi::http::types::Method;
use node_runtime_agent::http::Request;
use node_runtime_agent::llm::{self, ChatRequest, LlmError, Message, Tool, ToolCall};
use node_runtime_agent::log::{self, Level};
use node_runtime_agent::{Context, Error, Output};

/// Model calls at most, unless the input says otherwise.
const DEFAULT_TURNS: u32 = 6;
/// The most of a tool's answer handed to the model.
const MAX_TOOL_RESULT: usize = 16 * 1024;

fn run(context: Context) -> Result<Output, Error> {
    let question = context
        .input()
        .ok_or_else(|| Error::fatal("input_ref[\"message\"] is missing"))?;
    let tool_url = context
        .get("tool_url")
        .ok_or_else(|| Error::fatal("input_ref[\"tool_url\"] is missing"))?;
    let max_turns = context
        .get("max_turns")
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_TURNS);
    let tools = vec![Tool::new(
        "lookup_vendor",
        "Looks a vendor up in the vendor registry: its category and the department that pays it.",
        r#"{"type": "object", "properties": {"vendor": {"type": "string", "description": "The vendor's name"}}, "required": ["vendor"]}"#,
    )];
    let mut messages = vec![
        Message::system("You route invoices. Call lookup_vendor to learn about a vendor before you answer."),
        Message::user(question),
    ];
    let (mut calls, mut errors) = (0u32, 0u32);
    for turn in 1..=max_turns {
        let mut request = ChatRequest::new(messages.clone()).with_tools(tools.clone());
        request.max_tokens = Some(300);
        request.temperature = Some(0.0);
        let answer = llm::chat(&request).map_err(|err| match err {
            LlmError::BudgetExhausted(why) => Error::fatal(format!(
                "the run's LLM token budget ran out after {} model calls and {calls} tool calls: {why}",
                turn - 1
            )),
            other => Error {
                message: format!("the model call failed: {other:?}"),
                retryable: other.is_retryable(),
            },
        })?;
        if answer.tool_calls.is_empty() {
            return Ok(Output::from([
                ("answer".into(), answer.content),
                ("turns".into(), turn.to_string()),
                ("tool_calls".into(), calls.to_string()),
                ("tool_errors".into(), errors.to_string()),
            ]));
        }
        messages.push(Message::assistant(&answer));
        for call in &answer.tool_calls {
            calls += 1;
            let result = match call_tool(call, tool_url) {
                Ok(body) => body,
                Err(why) => {
                    errors += 1;
                    log::write(Level::Warn, "a tool call failed", &[("error", &why)]);
                    serde_json::json!({ "error": why }).to_string()
                }
            };
            messages.push(Message::tool_result(&call.id, &result));
        }
    }
    Err(Error::fatal(format!(
        "the model was still calling tools after {max_turns} turns ({calls} tool calls); giving up"
    )))
}

/// Serves one tool call: its arguments posted to the API; the answer's
/// body (at most [`MAX_TOOL_RESULT`] bytes), or why there is none.
fn call_tool(call: &ToolCall, url: &str) -> Result<String, String> {
    if call.name != "lookup_vendor" {
        return Err(format!("there is no tool named {:?}", call.name));
    }
    if serde_json::from_str::<serde_json::Value>(&call.arguments).is_err() {
        return Err("the arguments are not JSON".to_string());
    }
    let mut bytes = Vec::new();
    let status = Request::new(Method::Post, url)
        .header("content-type", "application/json")
        .body(call.arguments.as_bytes())
        .send_with(|chunk| {
            bytes.extend_from_slice(chunk);
            bytes.len() < MAX_TOOL_RESULT
        })
        .map_err(|err| format!("the request failed: {err}"))?;
    bytes.truncate(MAX_TOOL_RESULT);
    let body = String::from_utf8_lossy(&bytes).into_owned();
    if !(200..300).contains(&status) {
        return Err(format!("the vendor registry answered {status}: {body}"));
    }
    Ok(body)
}

node_runtime_agent::export!(run);
