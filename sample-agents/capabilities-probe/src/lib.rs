//! Calls every host capability of the agent world once and returns what it
//! saw: the `budget` readings, the answer of `llm.chat`, and the answer of
//! an outbound HTTP request. Tests use it to check each import is wired to
//! the run's meters and policies.

wit_bindgen::generate!({ world: "agent", path: "../../wit", generate_all });

use node_runtime::agent::llm::{self, ChatRequest, Message, Role};
use node_runtime::agent::{budget, log};
use wasi::http::outgoing_handler;
use wasi::http::types::{Fields, OutgoingRequest, Scheme};

struct Probe;

impl Guest for Probe {
    fn run(_context: RunContext) -> Result<StringMap, AgentError> {
        let remaining = budget::remaining();
        let mut seen = vec![
            ("budget.fuel".to_string(), remaining.fuel.to_string()),
            ("budget.memory_bytes".to_string(), remaining.memory_bytes.to_string()),
            ("budget.time_ms".to_string(), remaining.time_ms.to_string()),
            ("budget.tokens".to_string(), remaining.tokens.to_string()),
        ];

        let answer = llm::chat(&ChatRequest {
            model: None,
            messages: vec![Message {
                role: Role::User,
                content: "Classify this invoice.".to_string(),
            }],
            max_tokens: Some(50),
            temperature: None,
        });
        let llm = match answer {
            Ok(response) => format!("ok: {}", response.content),
            Err(error) => format!("error: {error:?}"),
        };
        seen.push(("llm".to_string(), llm));
        seen.push(("http".to_string(), fetch("example.com")));

        log::log(
            log::Level::Info,
            "probed",
            &[("entries".to_string(), seen.len().to_string())],
        );
        Ok(seen)
    }
}

/// GET https://{authority}/ and describe what came back.
fn fetch(authority: &str) -> String {
    let request = OutgoingRequest::new(Fields::new());
    // Setting fields on a fresh request cannot fail for valid values.
    let _ = request.set_scheme(Some(&Scheme::Https));
    let _ = request.set_authority(Some(authority));
    let _ = request.set_path_with_query(Some("/"));
    let pending = match outgoing_handler::handle(request, None) {
        Ok(pending) => pending,
        Err(code) => return format!("error: {code:?}"),
    };
    pending.subscribe().block();
    match pending.get() {
        Some(Ok(Ok(response))) => format!("status {}", response.status()),
        Some(Ok(Err(code))) => format!("error: {code:?}"),
        Some(Err(())) => "error: response already taken".to_string(),
        None => "error: no response after the pollable was ready".to_string(),
    }
}

export!(Probe);
