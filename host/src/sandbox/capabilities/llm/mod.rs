//! The LLM capability: `llm.chat` against the provider the node is
//! configured with. Everything about it is here, in three parts:
//!
//! - its settings (`settings.rs`): [`LlmSettings`] (the endpoint, the key,
//!   the default model and temperature, the per-request timeout) and the
//!   price table of [`ModelPrice`]s, and the allowed models;
//! - the prompt estimate (`prompt_estimate.rs`): a prompt's tokens, known
//!   before it is sent, so a call that cannot fit the budget is refused;
//! - its shared part (`client.rs`): the one [`LlmClient`] every run's calls
//!   go through (pooled connections, retries with backoff within the run's
//!   deadline, capped requests and answers, the key masked in errors);
//! - its per-run part (`chat.rs`): `RunLlm`, the client and the run's
//!   model, and the `llm.chat` host function, which meters each call
//!   against the run's token budget and prices it.
//!
//! [`add_to_linker`] offers `llm.chat` to every component; on a node with
//! no LLM configured (a run state built without `RunStateBuilder::llm`) it
//! answers `not-configured`.

mod chat;
mod client;
mod prompt_estimate;
mod settings;
mod tools;

use wasmtime::component::{HasSelf, Linker};

use crate::sandbox::bindings;
use crate::sandbox::state::RunState;

pub(crate) use chat::{ChatFailure, RunLlm};
pub use client::{LLM_REQUEST_BYTES, LLM_RESPONSE_BYTES, LlmClient, LlmClientError};
pub use prompt_estimate::{TOKENS_PER_MESSAGE, TOKENS_PER_REQUEST};
pub use settings::{AZURE_API_VERSION, LlmEndpoint, LlmSettings, ModelPrice};

/// Offers `llm.chat` in both versions of the agent world (the host side
/// is [`RunState`]'s `llm::Host` impls: 0.1.0's in `chat.rs`, 0.2.0's,
/// with tools and response formats, in `tools.rs`).
pub(crate) fn add_to_linker(linker: &mut Linker<RunState>) -> wasmtime::Result<()> {
    bindings::llm::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    bindings::v2::llm::add_to_linker::<_, HasSelf<_>>(linker, |state| state)
}
