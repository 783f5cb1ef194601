//! One outbound HTTP request, described: GETs `input_ref["url"]` (or POSTs
//! `input_ref["body"]` to it when present, as JSON), and returns the status
//! and the number of body bytes read, or the error the node answered.
//! Always completes, so tests can read what the guest saw in the result.
//! Written with the Rust SDK's HTTP client (`kit/rust/sdk`), on the agent
//! world 0.2.0; the body is counted, not kept.
//!
//! Result keys: `status` (the HTTP status, when a response came),
//! `body_bytes` (bytes read before the body ended), `body_error` (why the
//! body stopped early, if it did), `error` (why there was no response).

use node_runtime_agent::bindings::wasi::http::types::Method;
use node_runtime_agent::http::{self, Request};
use node_runtime_agent::{Context, Error, Output};

fn run(context: Context) -> Result<Output, Error> {
    let url = context
        .get("url")
        .ok_or_else(|| Error::fatal("input_ref[\"url\"] is missing"))?;
    let body = context.get("body");
    let method = if body.is_some() { Method::Post } else { Method::Get };
    let request = Request::new(method, url)
        .header("content-type", "application/json")
        // The node replaces this with the run id.
        .header("x-correlation-id", "set-by-the-guest")
        .body(body.unwrap_or("").as_bytes());
    let mut read: u64 = 0;
    let mut seen = Output::new();
    match request.send_with(|chunk| {
        read += chunk.len() as u64;
        true
    }) {
        Ok(status) => {
            seen.insert("status".to_string(), status.to_string());
            seen.insert("body_bytes".to_string(), read.to_string());
        }
        Err(http::Error::Body { status, read, why }) => {
            seen.insert("status".to_string(), status.to_string());
            seen.insert("body_error".to_string(), why);
            seen.insert("body_bytes".to_string(), read.to_string());
        }
        Err(error) => {
            seen.insert("error".to_string(), error.to_string());
        }
    }
    Ok(seen)
}

node_runtime_agent::export!(run);
