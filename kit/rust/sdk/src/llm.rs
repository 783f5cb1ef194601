//! Chat completion through the node: it holds the credentials, meters the
//! run's tokens and refuses calls once they are spent.
//!
//! ```ignore
//! let answer = llm::chat(&ChatRequest::new(vec![Message::user("Say hi")]))?;
//! ```

pub use crate::bindings::node_runtime::agent::llm::{
    ChatRequest, ChatResponse, JsonSchema, LlmError, Message, ResponseFormat, Role, Tool, ToolCall, Usage,
};

/// One chat completion, metered against the run's token budget.
pub fn chat(request: &ChatRequest) -> Result<ChatResponse, LlmError> {
    crate::bindings::node_runtime::agent::llm::chat(request)
}

impl ChatRequest {
    /// The node's default model, no tools, free text.
    pub fn new(messages: Vec<Message>) -> Self {
        ChatRequest {
            model: None,
            messages,
            max_tokens: None,
            temperature: None,
            tools: Vec::new(),
            response_format: None,
        }
    }

    /// Tools the model may ask to call; the agent calls them.
    pub fn with_tools(mut self, tools: Vec<Tool>) -> Self {
        self.tools = tools;
        self
    }

    /// An answer that matches `schema` (JSON text), strictly.
    pub fn with_json_schema(mut self, name: &str, schema: &str) -> Self {
        self.response_format = Some(ResponseFormat::JsonSchema(JsonSchema {
            name: name.to_string(),
            schema: schema.to_string(),
            strict: true,
        }));
        self
    }
}

impl Message {
    pub fn system(text: &str) -> Self {
        Self::text(Role::System, text)
    }

    pub fn user(text: &str) -> Self {
        Self::text(Role::User, text)
    }

    /// The model's answer, tool calls included, to send back before the
    /// tools' results.
    pub fn assistant(response: &ChatResponse) -> Self {
        Message {
            role: Role::Assistant,
            content: response.content.clone(),
            tool_calls: response.tool_calls.clone(),
            tool_call_id: None,
        }
    }

    /// A tool's result, answering the call `call_id`.
    pub fn tool_result(call_id: &str, result: &str) -> Self {
        Message {
            role: Role::Tool,
            content: result.to_string(),
            tool_calls: Vec::new(),
            tool_call_id: Some(call_id.to_string()),
        }
    }

    fn text(role: Role, text: &str) -> Self {
        Message {
            role,
            content: text.to_string(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

impl Tool {
    /// `parameters`: the JSON Schema of the arguments, as JSON text.
    pub fn new(name: &str, description: &str, parameters: &str) -> Self {
        Tool {
            name: name.to_string(),
            description: description.to_string(),
            parameters: parameters.to_string(),
        }
    }
}

impl LlmError {
    /// Whether the same call could succeed later: a timeout or a provider
    /// failure may pass; a spent budget or a bad request will not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LlmError::Timeout(_) | LlmError::Provider(_))
    }
}
