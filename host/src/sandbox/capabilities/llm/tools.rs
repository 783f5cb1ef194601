//! `llm.chat` of the agent world 0.2.0: tool definitions, the model's
//! tool calls, `tool` messages carrying results back, and response formats
//! (text, a JSON object, a JSON Schema).
//!
//! The request is checked and turned into the provider's shape here, then
//! metered by the same `RunState::metered_call` as 0.1.0's calls (model
//! allowed, prompt estimated with the tool schemas counted, `max_tokens`
//! lowered to fit, usage counted and priced). The node never calls a tool
//! itself: it passes the model's calls to the agent, which calls what it
//! may (an HTTP API through `wasi:http`, under the run's egress policy)
//! and hands the result back.
//!
//! What is checked, so that a malformed request fails as
//! `invalid-request` naming the part rather than as a provider's 400:
//! tool and schema names (letters, digits, `_`, `-`, at most 64), each
//! parameter schema and response schema valid JSON (a tool's an object),
//! no two tools of one name, at most [`MAX_TOOLS`] tools, and each `tool`
//! message answering a call id.

use std::collections::HashSet;

use serde_json::Value;

use super::chat::{ChatFailure, LlmCall};
use super::client::{ProviderCalledFunction, ProviderFunction, ProviderMessage, ProviderTool, ProviderToolCall};
use crate::sandbox::bindings::llm::LlmError as V1Error;
use crate::sandbox::bindings::v2::llm::{
    ChatRequest, ChatResponse, Host, LlmError, Message, ResponseFormat, Role, Tool, ToolCall, Usage,
};
use crate::sandbox::state::RunState;

/// The most tools one call may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;
/// The longest tool or schema name (the providers' limit).
const MAX_NAME: usize = 64;
/// What a handed-back tool call is charged as host work beyond its
/// strings (an empty one is still a record to check and write out).
const PER_CALL_BYTES: usize = 64;

impl Host for RunState {
    async fn chat(&mut self, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        let call = call(request).map_err(LlmError::InvalidRequest)?;
        let answer = self
            .metered_call(call)
            .await
            .map_err(|failure: ChatFailure| match failure.error {
                V1Error::NotConfigured(m) => LlmError::NotConfigured(m),
                V1Error::BudgetExhausted(m) => LlmError::BudgetExhausted(m),
                V1Error::Timeout(m) => LlmError::Timeout(m),
                V1Error::Provider(m) => LlmError::Provider(m),
                V1Error::InvalidRequest(m) => LlmError::InvalidRequest(m),
            })?;
        Ok(ChatResponse {
            content: answer.content,
            tool_calls: answer
                .tool_calls
                .into_iter()
                .map(|call| ToolCall {
                    id: call.id,
                    name: call.function.name,
                    arguments: call.function.arguments,
                })
                .collect(),
            model: answer.model,
            usage: Usage {
                tokens_in: answer.tokens_in,
                tokens_out: answer.tokens_out,
            },
            finish_reason: answer.finish_reason,
        })
    }
}

/// The request, checked, in the provider's shape.
fn call(request: ChatRequest) -> Result<LlmCall, String> {
    let mut bytes = 0;
    let mut tools = Vec::with_capacity(request.tools.len());
    if request.tools.len() > MAX_TOOLS {
        return Err(format!(
            "the request offers {} tools, more than the {MAX_TOOLS} a call may offer",
            request.tools.len()
        ));
    }
    for Tool {
        name,
        description,
        parameters,
    } in request.tools
    {
        bytes += name.len() + description.len() + parameters.len();
        check_name("a tool's name", &name)?;
        if tools.iter().any(|tool: &ProviderTool| tool.function.name == name) {
            return Err(format!("two tools are named {name:?}: give each its own name"));
        }
        let parameters = json(&format!("tool {name:?}'s parameters"), &parameters)?;
        if !parameters.is_object() {
            return Err(format!(
                "tool {name:?}'s parameters must be a JSON Schema object, e.g. {{\"type\": \"object\", \"properties\": {{...}}}}"
            ));
        }
        tools.push(ProviderTool {
            kind: "function",
            function: ProviderFunction {
                name,
                description,
                parameters,
            },
        });
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    // The calls handed back so far, and those already answered.
    let mut asked: HashSet<String> = HashSet::new();
    let mut answered: HashSet<String> = HashSet::new();
    for (index, message) in request.messages.into_iter().enumerate() {
        let Message {
            role,
            content,
            tool_calls,
            tool_call_id,
        } = message;
        bytes += content.len() + tool_call_id.as_ref().map_or(0, String::len);
        let role = match role {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        };
        if !tool_calls.is_empty() && role != "assistant" {
            return Err(format!(
                "message {index} is a {role} message with tool calls: only an assistant message carries them"
            ));
        }
        let mut handed_back = Vec::with_capacity(tool_calls.len());
        for ToolCall { id, name, arguments } in tool_calls {
            // Each call is host work however empty its strings.
            bytes += PER_CALL_BYTES + id.len() + name.len() + arguments.len();
            check_name(&format!("message {index}'s tool call"), &name)?;
            if id.is_empty() || !asked.insert(id.clone()) {
                return Err(format!(
                    "message {index} hands back a tool call with an empty or repeated id: hand back the \
                     model's calls as it gave them"
                ));
            }
            // Empty arguments are a call without any (some servers send them so).
            if !arguments.is_empty() && serde_json::from_str::<serde::de::IgnoredAny>(&arguments).is_err() {
                return Err(format!(
                    "message {index} hands back tool call {:?} whose arguments are not JSON: hand back \
                     the model's calls as it gave them",
                    crate::sandbox::capabilities::log::truncate(&id, 100)
                ));
            }
            handed_back.push(ProviderToolCall {
                id,
                kind: "function".to_string(),
                function: ProviderCalledFunction { name, arguments },
            });
        }
        let tool_calls = handed_back;
        match (role, &tool_call_id) {
            ("tool", None) => {
                return Err(format!(
                    "message {index} is a tool message without tool-call-id: say which of the model's \
                     calls it answers"
                ));
            }
            ("tool", Some(id)) if !answered.insert(id.clone()) => {
                return Err(format!(
                    "message {index} answers the tool call {:?} a second time: answer each call once",
                    crate::sandbox::capabilities::log::truncate(id, 100)
                ));
            }
            ("tool", Some(id)) if !asked.contains(id) => {
                return Err(format!(
                    "message {index} answers the tool call {:?}, which no earlier assistant message \
                     carries: hand the model's assistant message back before the results",
                    crate::sandbox::capabilities::log::truncate(id, 100)
                ));
            }
            (_, Some(_)) if role != "tool" => {
                return Err(format!(
                    "message {index} is a {role} message with a tool-call-id: only a tool message answers a call"
                ));
            }
            _ => {}
        }
        messages.push(ProviderMessage {
            role,
            content,
            tool_calls,
            tool_call_id,
        });
    }
    let response_format = match request.response_format {
        None => None,
        Some(ResponseFormat::Text) => Some(serde_json::json!({"type": "text"})),
        Some(ResponseFormat::JsonObject) => Some(serde_json::json!({"type": "json_object"})),
        Some(ResponseFormat::JsonSchema(format)) => {
            bytes += format.name.len() + format.schema.len();
            check_name("the response schema's name", &format.name)?;
            let schema = json("the response schema", &format.schema)?;
            if !schema.is_object() {
                return Err(
                    "the response schema must be a JSON Schema object, e.g. {\"type\": \"object\", ...}".into(),
                );
            }
            Some(serde_json::json!({
                "type": "json_schema",
                "json_schema": {"name": format.name, "schema": schema, "strict": format.strict},
            }))
        }
    };
    Ok(LlmCall {
        model: request.model,
        messages,
        max_tokens: request.max_tokens,
        temperature: request.temperature,
        tools,
        response_format,
        bytes,
    })
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{what} {:?} is not a name providers take: letters, digits, `_` and `-`, 1 to {MAX_NAME}",
            crate::sandbox::capabilities::log::truncate(name, 100)
        ))
    }
}

fn json(what: &str, text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|err| format!("{what} is not JSON: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::bindings::v2::llm::JsonSchema;

    fn message(role: Role, content: &str) -> Message {
        Message {
            role,
            content: content.to_string(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    fn request(messages: Vec<Message>, tools: Vec<Tool>) -> ChatRequest {
        ChatRequest {
            model: None,
            messages,
            max_tokens: None,
            temperature: None,
            tools,
            response_format: None,
        }
    }

    fn lookup() -> Tool {
        Tool {
            name: "lookup_vendor".into(),
            description: "Looks a vendor up".into(),
            parameters: r#"{"type": "object", "properties": {"vendor": {"type": "string"}}}"#.into(),
        }
    }

    #[test]
    fn a_tool_loop_turns_into_the_providers_shape() {
        let assistant = Message {
            tool_calls: vec![ToolCall {
                id: "call_1".into(),
                name: "lookup_vendor".into(),
                arguments: r#"{"vendor": "Paper Co"}"#.into(),
            }],
            ..message(Role::Assistant, "")
        };
        let result = Message {
            tool_call_id: Some("call_1".into()),
            ..message(Role::Tool, r#"{"category": "Office Supplies"}"#)
        };
        let mut asked = request(vec![message(Role::User, "classify"), assistant, result], vec![lookup()]);
        asked.response_format = Some(ResponseFormat::JsonSchema(JsonSchema {
            name: "invoice".into(),
            schema: r#"{"type": "object"}"#.into(),
            strict: true,
        }));
        let call = call(asked).unwrap();
        let json = serde_json::to_value(&call.messages).unwrap();
        assert_eq!(json[1]["tool_calls"][0]["function"]["name"], "lookup_vendor");
        assert_eq!(json[1]["tool_calls"][0]["type"], "function");
        assert_eq!(json[2]["tool_call_id"], "call_1");
        assert_eq!(json[2]["role"], "tool");
        assert!(json[0].get("tool_calls").is_none(), "{json}");
        let tools = serde_json::to_value(&call.tools).unwrap();
        assert_eq!(tools[0]["type"], "function");
        assert_eq!(tools[0]["function"]["parameters"]["type"], "object");
        let format = call.response_format.unwrap();
        assert_eq!(format["type"], "json_schema");
        assert_eq!(format["json_schema"]["strict"], true);
        assert_eq!(format["json_schema"]["schema"]["type"], "object");
    }

    #[test]
    fn malformed_requests_are_refused_naming_the_part() {
        let bad_schema = Tool {
            parameters: "{not json".into(),
            ..lookup()
        };
        let cases = [
            (
                request(vec![message(Role::User, "x")], vec![bad_schema]),
                "parameters is not JSON",
            ),
            (
                request(
                    vec![message(Role::User, "x")],
                    vec![Tool {
                        name: "has space".into(),
                        ..lookup()
                    }],
                ),
                "not a name",
            ),
            (
                request(vec![message(Role::User, "x")], vec![lookup(), lookup()]),
                "two tools",
            ),
            (
                request(
                    vec![message(Role::User, "x")],
                    vec![Tool {
                        parameters: "[1]".into(),
                        ..lookup()
                    }],
                ),
                "JSON Schema object",
            ),
            (
                request(vec![message(Role::Tool, "result")], vec![]),
                "without tool-call-id",
            ),
            (
                request(
                    vec![Message {
                        tool_call_id: Some("call_9".into()),
                        ..message(Role::Tool, "result")
                    }],
                    vec![],
                ),
                "no earlier assistant message",
            ),
            (
                request(
                    vec![message(Role::User, "x")],
                    (0..=MAX_TOOLS)
                        .map(|n| Tool {
                            name: format!("t{n}"),
                            ..lookup()
                        })
                        .collect(),
                ),
                "more than",
            ),
        ];
        for (asked, says) in cases {
            let err = call(asked).unwrap_err();
            assert!(err.contains(says), "{says:?} not in {err}");
        }
    }
}
