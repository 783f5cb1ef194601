//! Outbound HTTP over `wasi:http`. The node allows only the hosts the run
//! is granted; a refused request is [`Error::Denied`], which an agent can
//! handle (tell the model, fall back, fail).
//!
//! ```ignore
//! let response = http::get("https://api.example.com/v1/rates")?;
//! let text = response.text();
//! ```

use std::fmt;

use crate::bindings::wasi::http::outgoing_handler;
use crate::bindings::wasi::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use crate::bindings::wasi::io::streams::StreamError;

/// Why a request got no (whole) response.
#[derive(Debug, Clone)]
pub enum Error {
    /// The node refused the request: its host is not on the run's
    /// allow-list.
    Denied,
    /// The URL is not `http://` or `https://` with a host.
    InvalidUrl(String),
    /// The request failed (connection, timeout, protocol), as the node
    /// reported it.
    Failed(ErrorCode),
    /// Writing the request's body failed.
    Write(String),
    /// The node gave no response and no reason.
    NoResponse,
    /// The response (`status`) came, but its body stopped early, after
    /// `read` bytes.
    Body { status: u16, read: u64, why: String },
    /// A header name or value the node refused.
    Header(String),
}

impl Error {
    /// Whether trying later could help: not for a denial or a bad URL.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Failed(_) | Error::Write(_) | Error::Body { .. })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Denied => f.write_str("HttpRequestDenied (the host is not on the run's allow-list)"),
            Error::InvalidUrl(url) => write!(f, "{url:?} is not an http:// or https:// URL"),
            Error::Failed(code) => write!(f, "{code:?}"),
            Error::Write(why) => write!(f, "writing the body: {why}"),
            Error::NoResponse => f.write_str("no response"),
            Error::Body { read, why, .. } => write!(f, "the body stopped after {read} bytes: {why}"),
            Error::Header(why) => write!(f, "bad header: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// A response, its body read whole.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A request to build: method, URL, headers, body.
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// `GET url`.
pub fn get(url: &str) -> Result<Response, Error> {
    Request::new(Method::Get, url).send()
}

/// `POST url` with a JSON body.
pub fn post_json(url: &str, json: &str) -> Result<Response, Error> {
    Request::new(Method::Post, url)
        .header("content-type", "application/json")
        .body(json.as_bytes())
        .send()
}

impl Request {
    pub fn new(method: Method, url: &str) -> Self {
        Request {
            method,
            url: url.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.as_bytes().to_vec()));
        self
    }

    pub fn body(mut self, body: &[u8]) -> Self {
        self.body = body.to_vec();
        self
    }

    /// Sends the request and reads the whole response. The node bounds
    /// the wait by the run's deadline.
    pub fn send(self) -> Result<Response, Error> {
        let mut body = Vec::new();
        let status = self.send_with(|chunk| {
            body.extend_from_slice(chunk);
            true
        })?;
        Ok(Response { status, body })
    }

    /// Sends the request and hands the response's body to `chunk` piece
    /// by piece, keeping none of it, until `chunk` returns `false` or the
    /// body ends; returns the status.
    pub fn send_with(self, mut chunk: impl FnMut(&[u8]) -> bool) -> Result<u16, Error> {
        let (scheme, rest) = match self.url.split_once("://") {
            Some(("http", rest)) => (Scheme::Http, rest),
            Some(("https", rest)) => (Scheme::Https, rest),
            _ => return Err(Error::InvalidUrl(self.url)),
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(Error::InvalidUrl(self.url.clone()));
        }
        let headers = Fields::from_list(&self.headers).map_err(|err| Error::Header(format!("{err:?}")))?;
        let request = OutgoingRequest::new(headers);
        let _ = request.set_method(&self.method);
        let _ = request.set_scheme(Some(&scheme));
        let _ = request.set_authority(Some(authority));
        let _ = request.set_path_with_query(Some(path));
        let outgoing = request.body().expect("a new request's body is there to take");
        // Generous timeouts of its own: the node's are shorter.
        let options = RequestOptions::new();
        let _ = options.set_connect_timeout(Some(600_000_000_000));
        let _ = options.set_first_byte_timeout(Some(600_000_000_000));
        let pending = outgoing_handler::handle(request, Some(options)).map_err(from_code)?;
        // A request the node refuses fails its body's stream first; the
        // reason is the response's error, read below.
        let written = write_body(&outgoing, &self.body);
        let finished = OutgoingBody::finish(outgoing, None);
        pending.subscribe().block();
        let response = match pending.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(from_code(code)),
            _ => return Err(written.err().unwrap_or(Error::NoResponse)),
        };
        written?;
        finished.map_err(from_code)?;
        let status = response.status();
        let incoming = response.consume().expect("a new response's body is there to take");
        let mut read: u64 = 0;
        {
            let stream = incoming.stream().expect("a new body's stream is there to take");
            loop {
                match stream.blocking_read(64 * 1024) {
                    Ok(bytes) => {
                        read += bytes.len() as u64;
                        if !chunk(&bytes) {
                            break;
                        }
                    }
                    Err(StreamError::Closed) => break,
                    Err(StreamError::LastOperationFailed(error)) => {
                        let why = match crate::bindings::wasi::http::types::http_error_code(&error) {
                            Some(code) => format!("{code:?}"),
                            // The first line: the rest may be a host backtrace.
                            None => error.to_debug_string().lines().next().unwrap_or("").to_string(),
                        };
                        return Err(Error::Body { status, read, why });
                    }
                }
            }
        }
        let _ = IncomingBody::finish(incoming);
        Ok(status)
    }
}

fn write_body(outgoing: &OutgoingBody, body: &[u8]) -> Result<(), Error> {
    let stream = outgoing
        .write()
        .map_err(|()| Error::Write("the body's stream was already taken".to_string()))?;
    for chunk in body.chunks(4096) {
        stream
            .blocking_write_and_flush(chunk)
            .map_err(|err| Error::Write(format!("{err:?}")))?;
    }
    Ok(())
}

fn from_code(code: ErrorCode) -> Error {
    match code {
        ErrorCode::HttpRequestDenied => Error::Denied,
        code => Error::Failed(code),
    }
}
