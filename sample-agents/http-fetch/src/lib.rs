//! One outbound HTTP request, described: GETs `input_ref["url"]` (or POSTs
//! `input_ref["body"]` to it when present, as JSON), and returns the status
//! and the number of body bytes read, or the error the node answered.
//! Always completes, so tests can read what the guest saw in the result.
//!
//! Result keys: `status` (the HTTP status, when a response came),
//! `body_bytes` (bytes read before the body ended), `body_error` (why the
//! body stopped early, if it did), `error` (why there was no response).

wit_bindgen::generate!({ world: "agent", path: "../../wit", generate_all });

use wasi::http::outgoing_handler;
use wasi::http::types::{Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme};
use wasi::io::streams::StreamError;

struct HttpFetch;

impl Guest for HttpFetch {
    fn run(context: RunContext) -> Result<StringMap, AgentError> {
        let input = |key: &str| {
            context
                .input_ref
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let Some(url) = input("url") else {
            return Err(AgentError {
                message: "input_ref[\"url\"] is missing".to_string(),
                retryable: false,
            });
        };
        let mut seen = Vec::new();
        match fetch(&url, input("body").as_deref(), &mut seen) {
            Ok(()) => {}
            Err(error) => seen.push(("error".to_string(), error)),
        }
        Ok(seen)
    }
}

fn fetch(url: &str, body: Option<&str>, seen: &mut Vec<(String, String)>) -> Result<(), String> {
    let (scheme, rest) = match url.split_once("://") {
        Some(("http", rest)) => (Scheme::Http, rest),
        Some(("https", rest)) => (Scheme::Https, rest),
        _ => return Err(format!("url {url:?} is not an http:// or https:// URL")),
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let headers = Fields::from_list(&[
        ("content-type".to_string(), b"application/json".to_vec()),
        // The node replaces this with the run id.
        ("x-correlation-id".to_string(), b"set-by-the-guest".to_vec()),
    ])
    .map_err(|err| format!("bad header: {err:?}"))?;
    let request = OutgoingRequest::new(headers);
    let _ = request.set_method(if body.is_some() { &Method::Post } else { &Method::Get });
    let _ = request.set_scheme(Some(&scheme));
    let _ = request.set_authority(Some(authority));
    let _ = request.set_path_with_query(Some(path));
    let outgoing = request
        .body()
        .map_err(|()| "the request body was already taken".to_string())?;
    // Generous timeouts of its own: the node bounds them by the run's
    // deadline.
    let options = RequestOptions::new();
    let _ = options.set_connect_timeout(Some(600_000_000_000));
    let _ = options.set_first_byte_timeout(Some(600_000_000_000));
    let pending = outgoing_handler::handle(request, Some(options)).map_err(|code| format!("{code:?}"))?;
    {
        let stream = outgoing.write().map_err(|()| "cannot write the body".to_string())?;
        for chunk in body.unwrap_or("").as_bytes().chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|err| format!("writing the body: {err:?}"))?;
        }
    }
    OutgoingBody::finish(outgoing, None).map_err(|code| format!("{code:?}"))?;
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => return Err(format!("{code:?}")),
        _ => return Err("no response".to_string()),
    };
    seen.push(("status".to_string(), response.status().to_string()));
    let incoming = response
        .consume()
        .map_err(|()| "the body was already taken".to_string())?;
    let mut bytes: u64 = 0;
    {
        let stream = incoming
            .stream()
            .map_err(|()| "the body stream was already taken".to_string())?;
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => bytes += chunk.len() as u64,
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(error)) => {
                    let code = wasi::http::types::http_error_code(&error);
                    let text = match code {
                        Some(code) => format!("{code:?}"),
                        // The first line: the rest may be a host backtrace.
                        None => error.to_debug_string().lines().next().unwrap_or("").to_string(),
                    };
                    seen.push(("body_error".to_string(), text));
                    break;
                }
            }
        }
    }
    let _ = IncomingBody::finish(incoming);
    seen.push(("body_bytes".to_string(), bytes.to_string()));
    Ok(())
}

export!(HttpFetch);
