//! The HTTP capability's outgoing handler: how an allowed request is sent.
//!
//! `wasi:http/outgoing-handler` hands every request to the run's
//! [`EgressPolicy`] (its `WasiHttpHooks` impl, here). A request to a host
//! (and port) not granted gets `HTTP-request-denied`, an error the agent
//! can handle, and the node logs the host it tried to reach; so does a
//! request past the run's in-flight limit (`connection-limit-reached`).
//! Denials and failures are logged for the first few of a run only, the
//! rest counted (`HostWarnings`). An
//! allowed request goes out through wasmtime-wasi-http's default sender in
//! an `http.request` span, with the run's trace context (`traceparent`
//! naming that span when traces are exported, `X-Correlation-ID`), its
//! connect and first-byte waits bounded by the run's deadline, its response
//! headers copied and bounded, and its response body capped at
//! [`HTTP_RESPONSE_BYTES`].

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::header::{HeaderName, HeaderValue};
use http::uri::Scheme;
use http_body_util::BodyExt;
use tracing::Instrument;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use super::egress::{EgressPolicy, InFlight};
use crate::sandbox::capabilities::log::HostWarning;

/// The events' target from before this file moved, so that log filters
/// written for it (`Logging.LogLevel`) still apply.
const LOG_TARGET: &str = "node_runtime::sandbox::capabilities::http";

/// The largest response body an agent may read; past it the body stream
/// ends with `HTTP-response-body-size`.
pub const HTTP_RESPONSE_BYTES: u64 = 1024 * 1024;

/// The OpenTelemetry span id of `span`, when spans are exported and this
/// one is in the run's trace.
fn otel_span_id(span: &tracing::Span) -> Option<u64> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = span.context();
    let otel = context.span();
    let span_context = otel.span_context();
    span_context
        .is_valid()
        .then(|| u64::from_be_bytes(span_context.span_id().to_bytes()))
}

/// The host and port a request goes to, the port defaulting from the
/// scheme.
pub(crate) fn destination(uri: &http::Uri) -> Option<(String, u16)> {
    let authority = uri.authority()?;
    let host = authority.host();
    if host.is_empty() {
        return None;
    }
    let port = match authority.port_u16() {
        Some(port) => port,
        None if uri.scheme() == Some(&Scheme::HTTP) => 80,
        None => 443,
    };
    Some((host.to_string(), port))
}

/// A response's headers as the run may keep them: copied out of hyper's
/// read buffer (whose slices would otherwise pin the whole buffer for as
/// long as the agent keeps a header map), and `None` when they take more
/// than `limit` by wasi-http's accounting, the limit the agent's own
/// header maps have.
fn owned_headers(headers: &http::HeaderMap, limit: usize) -> Option<http::HeaderMap> {
    let size: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + size_of::<HeaderName>() + value.len() + size_of::<HeaderValue>())
        .sum();
    if size > limit {
        return None;
    }
    let mut owned = http::HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_str().as_bytes()).ok()?;
        let mut copy = HeaderValue::from_bytes(value.as_bytes()).ok()?;
        copy.set_sensitive(value.is_sensitive());
        owned.append(name, copy);
    }
    Some(owned)
}

/// The lower of the guest's timeout and what remains until the deadline.
fn bounded(guest: Option<Duration>, left: Duration) -> Option<Duration> {
    Some(guest.map_or(left, |guest| guest.min(left)))
}

type SendFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), Error>> + Send>,
                ),
                Error,
            >,
        > + Send,
>;

impl WasiHttpHooks for EgressPolicy {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> SendFuture {
        // Called inside the run's span; the send itself runs on a task of
        // its own, so it is given its `http.request` span (below).
        // Each denial is counted; the first few of the run are logged.
        let Some((host, port)) = destination(request.uri()) else {
            self.denied += 1;
            if self.warnings.admit(HostWarning::EgressDenied) {
                tracing::warn!(target: LOG_TARGET, run_id = %self.run_id, "outbound HTTP denied: the request has no host");
            }
            return Box::new(async { Err(Error::HttpRequestDenied) });
        };
        if !self.allows(&host, port) {
            self.denied += 1;
            if self.warnings.admit(HostWarning::EgressDenied) {
                tracing::warn!(
                    target: LOG_TARGET, run_id = %self.run_id,
                    host = %host,
                    port,
                    "outbound HTTP denied: the host is not on this run's allow-list"
                );
            }
            return Box::new(async { Err(Error::HttpRequestDenied) });
        }
        let in_flight = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let place = InFlight(self.in_flight.clone());
        if in_flight >= self.limits.http_in_flight {
            drop(place);
            self.denied += 1;
            if self.warnings.admit(HostWarning::EgressDenied) {
                tracing::warn!(
                    target: LOG_TARGET, run_id = %self.run_id,
                    limit = self.limits.http_in_flight,
                    "outbound HTTP refused: the run has as many requests in flight as a run may"
                );
            }
            return Box::new(async { Err(Error::ConnectionLimitReached) });
        }
        let warnings = self.warnings.clone();
        self.requests += 1;
        tracing::debug!(target: LOG_TARGET, host = %host, port, "outbound HTTP request");

        // One span per request (a child of the run's); its span id is the
        // parent the downstream service sees in `traceparent`.
        let span = tracing::info_span!(
            target: LOG_TARGET, "http.request",
            "http.method" = %request.method(),
            "server.address" = %host,
            "server.port" = port,
            "http.status_code" = tracing::field::Empty,
            "error" = tracing::field::Empty,
        );
        let headers = request.headers_mut();
        if let Some(traceparent) = self.traceparent(otel_span_id(&span)) {
            headers.insert(HeaderName::from_static("traceparent"), traceparent);
        }
        headers.remove("tracestate");
        if let Ok(run_id) = HeaderValue::from_str(&self.run_id) {
            headers.insert(HeaderName::from_static("x-correlation-id"), run_id);
        }

        // Connect and first byte bounded by the run's deadline; the whole
        // exchange up to the response head too, whatever the guest asked.
        let deadline = self.deadline;
        let left = deadline.saturating_duration_since(Instant::now());
        let guest = options.unwrap_or_default();
        let options = RequestOptions {
            connect_timeout: bounded(guest.connect_timeout, left),
            first_byte_timeout: bounded(guest.first_byte_timeout, left),
            between_bytes_timeout: bounded(guest.between_bytes_timeout, left),
        };
        let field_bytes = self.limits.field_bytes;
        let cut_off = self.cut_off.clone();
        Box::new(
            async move {
                let sending = tokio::time::timeout_at(
                    deadline.into(),
                    wasmtime_wasi_http::default_send_request(request, Some(options)),
                );
                let sent = cut_off.run_until_cancelled(sending).await.and_then(Result::ok);
                let (response, io) = match sent {
                    Some(Ok(sent)) => sent,
                    Some(Err(err)) => {
                        tracing::Span::current().record("error", tracing::field::display(&err));
                        if warnings.admit(HostWarning::EgressFailed) {
tracing::info!(target: LOG_TARGET, host = %host, port, "outbound HTTP request failed: {err}");
}
                        return Err(err);
                    }
                    None => {
                        tracing::Span::current().record("error", "cut off by the run's deadline");
                        if warnings.admit(HostWarning::EgressFailed) {
tracing::info!(target: LOG_TARGET, host = %host, port, "outbound HTTP request cut off by the run's deadline");
}
                        return Err(Error::ConnectionTimeout);
                    }
                };
                tracing::Span::current().record("http.status_code", response.status().as_u16());
                let (mut head, body) = response.into_parts();
                head.headers = match owned_headers(&head.headers, field_bytes) {
                    Some(headers) => headers,
                    None => {
                        if warnings.admit(HostWarning::EgressFailed) {
tracing::info!(target: LOG_TARGET, host = %host, port, limit = field_bytes, "outbound HTTP response refused: its headers are larger than a run may hold");
}
                        return Err(Error::HttpResponseHeaderSectionSize(u32::try_from(field_bytes).ok()));
                    }
                };
                let response = http::Response::from_parts(head, body).map(|body| {
                    http_body_util::Limited::new(body, HTTP_RESPONSE_BYTES as usize)
                        .map_err(|err| match err.downcast::<Error>() {
                            Ok(err) => *err,
                            Err(_over_the_cap) => {
                                Error::HttpResponseBodySize(Some(HTTP_RESPONSE_BYTES))
                            }
                        })
                        .boxed_unsync()
                });
                // The connection's task holds the place until it ends, or
                // until the run is cut off (nothing is left to tell then:
                // an error would only be logged, without the run's ids).
                let io = async move {
                    let _place = place;
                    cut_off.run_until_cancelled(io).await.unwrap_or(Ok(()))
                };
                Ok((
                    response,
                    Box::new(io) as Box<dyn Future<Output = Result<(), Error>> + Send>,
                ))
            }
            .instrument(span),
        )
    }

    fn p2_outgoing_body_buffer_chunks(&mut self) -> usize {
        self.limits.body_buffer_chunks
    }

    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        self.limits.body_chunk_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_headers_are_copied_and_refused_past_the_limit() {
        let mut headers = http::HeaderMap::new();
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        let owned = owned_headers(&headers, 1024).expect("small headers are kept");
        assert_eq!(owned, headers);
        let big = HeaderValue::from_bytes(&[b'v'; 2000]).unwrap();
        headers.insert("x-big", big);
        assert!(owned_headers(&headers, 1024).is_none());
    }

    #[test]
    fn default_ports_come_from_the_scheme() {
        let uri: http::Uri = "http://Example.com/x".parse().unwrap();
        assert_eq!(destination(&uri), Some(("Example.com".into(), 80)));
        let uri: http::Uri = "https://example.com/x".parse().unwrap();
        assert_eq!(destination(&uri), Some(("example.com".into(), 443)));
        let uri: http::Uri = "http://[::1]:81/".parse().unwrap();
        assert_eq!(destination(&uri), Some(("[::1]".into(), 81)));
    }
}
