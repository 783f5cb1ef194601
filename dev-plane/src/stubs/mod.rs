//! Stand-ins for the outside world, for `node-runtime dev --demo` and for
//! tests: a deterministic chat-completions "model" that answers in the
//! shapes real providers use ([`StubModel`], OpenAI and Azure OpenAI), and
//! a target API that records what agents send it ([`StubTarget`]). They let
//! the demo and the tests show the LLM and HTTP paths end to end on a
//! machine with no model and no network; tests read what they recorded
//! in-process.
//!
//! - `model`: the stub model and its behaviours, chosen by model name.
//! - `target`: the recording target, which can be told to fail first.

mod model;
mod target;

use std::collections::VecDeque;
use std::net::SocketAddr;

pub use model::{
    STUB_ECHO_MODEL, STUB_MODEL, STUB_RATE_LIMITED_MODEL, STUB_REFUSAL_MODEL, STUB_TOOLS_FOREVER_MODEL,
    STUB_TOOLS_MODEL, StubModel, StubModelOptions, start_stub_model,
};
pub use target::StubTarget;

/// The most requests a stub keeps (the newest); older ones are counted
/// but forgotten.
pub const MAX_RECORDED: usize = 256;
/// The most of a request's body a stub keeps.
pub const MAX_RECORDED_BODY: usize = 1 << 20;

/// One request a stub received, as it arrived.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// The query string without `?`, if any.
    pub query: Option<String>,
    /// Names in lower case, in the order sent.
    pub headers: Vec<(String, String)>,
    /// At most [`MAX_RECORDED_BODY`] bytes.
    pub body: Vec<u8>,
    /// The status the stub answered with.
    pub status: u16,
}

impl RecordedRequest {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The body as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    fn of(parts: &axum::http::request::Parts, body: &[u8], status: u16) -> RecordedRequest {
        RecordedRequest {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().map(str::to_string),
            headers: parts
                .headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_string(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body[..body.len().min(MAX_RECORDED_BODY)].to_vec(),
            status,
        }
    }
}

/// What a stub received: every request counted, the newest kept.
#[derive(Debug, Default)]
struct Record {
    count: u64,
    kept: VecDeque<RecordedRequest>,
}

impl Record {
    fn push(&mut self, request: RecordedRequest) {
        self.count += 1;
        if self.kept.len() == MAX_RECORDED {
            self.kept.pop_front();
        }
        self.kept.push_back(request);
    }
}

/// Serves `app` on a free loopback port until the process ends.
async fn serve(app: axum::Router) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}
