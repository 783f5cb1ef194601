//! Calls `llm.chat` `calls` times (input_ref `calls`, default 1) with the
//! prompt in input_ref `message` and returns what it was told: each answer,
//! the model, the finish reason and the tokens the node reported, and the
//! first error it got (`error` = `budget-exhausted: ...`). An error ends
//! the calls but not the run: the agent completes with what it has, which
//! is how tests observe the node's metering from inside.
//!
//! Optional input_ref: `model` (the request's model), `max_tokens`.

wit_bindgen::generate!({ world: "agent", path: "../../wit", generate_all });

use node_runtime::agent::llm::{self, ChatRequest, LlmError, Message, Role};

struct LlmChat;

impl Guest for LlmChat {
    fn run(context: RunContext) -> Result<StringMap, AgentError> {
        let input = |key: &str| {
            context
                .input_ref
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let calls: u32 = input("calls").and_then(|v| v.parse().ok()).unwrap_or(1);
        let prompt = input("message").unwrap_or_else(|| "Hello".to_string());
        let model = input("model");
        let max_tokens = input("max_tokens").and_then(|v| v.parse().ok());

        let mut result = Vec::new();
        let mut made = 0;
        for call in 0..calls {
            let answer = llm::chat(&ChatRequest {
                model: model.clone(),
                messages: vec![Message {
                    role: Role::User,
                    content: prompt.clone(),
                }],
                max_tokens,
                temperature: None,
            });
            match answer {
                Ok(response) => {
                    made += 1;
                    result.push((format!("answer.{call}"), response.content));
                    result.push((format!("model.{call}"), response.model));
                    result.push((format!("finish_reason.{call}"), response.finish_reason));
                    result.push((format!("tokens_in.{call}"), response.usage.tokens_in.to_string()));
                    result.push((format!("tokens_out.{call}"), response.usage.tokens_out.to_string()));
                }
                Err(error) => {
                    let text = match error {
                        LlmError::NotConfigured(m) => format!("not-configured: {m}"),
                        LlmError::BudgetExhausted(m) => format!("budget-exhausted: {m}"),
                        LlmError::Timeout(m) => format!("timeout: {m}"),
                        LlmError::Provider(m) => format!("provider: {m}"),
                        LlmError::InvalidRequest(m) => format!("invalid-request: {m}"),
                    };
                    result.push(("error".to_string(), text));
                    result.push(("error_call".to_string(), call.to_string()));
                    break;
                }
            }
        }
        result.push(("calls_completed".to_string(), made.to_string()));
        Ok(result)
    }
}

export!(LlmChat);
