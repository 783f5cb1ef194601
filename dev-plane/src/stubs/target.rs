//! The recording target: an HTTP server that takes any request on any
//! path (the demo posts to `/invoices`), answers `201 Created` to a POST
//! and `200 OK` to anything else, and records each request (method, path,
//! headers, body; the newest [`super::MAX_RECORDED`]) for tests to read.
//!
//! It can be told to answer the next N requests with a status first
//! ([`StubTarget::answer_next`], e.g. 503, or 429 with `Retry-After`), to
//! test a sender's retries; those requests are recorded too, with the
//! status they got.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use support::sync::lock;

use super::{Record, RecordedRequest, serve};

/// The largest body the target reads; a larger one is answered 413.
const MAX_BODY: usize = 2 << 20;

/// A running recording target.
pub struct StubTarget {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    record: Mutex<Record>,
    /// Requests answered with a success status.
    accepted: AtomicU64,
    /// Answers to give before accepting again, first first.
    scripted: Mutex<VecDeque<Scripted>>,
}

#[derive(Debug, Clone, Copy)]
struct Scripted {
    status: StatusCode,
    retry_after: Option<Duration>,
}

impl StubTarget {
    pub async fn start() -> std::io::Result<StubTarget> {
        let shared = Arc::new(Shared::default());
        let app = axum::Router::new().fallback(receive).with_state(Arc::clone(&shared));
        let addr = serve(app).await?;
        Ok(StubTarget { addr, shared })
    }

    /// The base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many requests were accepted (answered 2xx).
    pub fn received(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// How many requests arrived, whatever they were answered.
    pub fn request_count(&self) -> u64 {
        lock(&self.shared.record).count
    }

    /// The newest requests (at most [`super::MAX_RECORDED`]), oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.record).kept.iter().cloned().collect()
    }

    /// Answers the next `count` requests with `status` (and `Retry-After`
    /// in whole seconds, when given) before accepting again; adds to what
    /// was asked before.
    pub fn answer_next(&self, count: usize, status: StatusCode, retry_after: Option<Duration>) {
        let mut scripted = lock(&self.shared.scripted);
        scripted.extend(std::iter::repeat_n(Scripted { status, retry_after }, count));
    }
}

impl std::fmt::Debug for StubTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StubTarget")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

async fn receive(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let (body, too_large) = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => (body, false),
        Err(_) => (Default::default(), true),
    };
    let scripted = if too_large {
        Some(Scripted {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            retry_after: None,
        })
    } else {
        lock(&shared.scripted).pop_front()
    };
    let response = match scripted {
        Some(Scripted { status, retry_after }) => {
            let mut response = status.into_response();
            if let Some(after) = retry_after
                && let Ok(value) = HeaderValue::from_str(&after.as_secs().to_string())
            {
                response.headers_mut().insert(axum::http::header::RETRY_AFTER, value);
            }
            response
        }
        None if parts.method == Method::POST => StatusCode::CREATED.into_response(),
        None => StatusCode::OK.into_response(),
    };
    if response.status().is_success() {
        shared.accepted.fetch_add(1, Ordering::Relaxed);
    }
    lock(&shared.record).push(RecordedRequest::of(&parts, &body, response.status().as_u16()));
    response
}
