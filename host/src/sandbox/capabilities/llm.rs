//! `llm.chat`: chat completion for agents.
//!
//! The provider client (an OpenAI-compatible endpoint, metered against the
//! run's token budget) is not part of this node yet: every call answers
//! `not-configured`, an error the agent can handle, and spends nothing.

use crate::sandbox::bindings::llm::{ChatRequest, ChatResponse, Host, LlmError};
use crate::sandbox::state::RunState;

impl Host for RunState {
    async fn chat(&mut self, _request: ChatRequest) -> Result<ChatResponse, LlmError> {
        Err(LlmError::NotConfigured(
            "no LLM endpoint configured on this node".to_string(),
        ))
    }
}
