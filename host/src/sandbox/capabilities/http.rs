//! Outbound HTTP (`wasi:http/outgoing-handler`): the egress policy.
//!
//! Every request an agent makes passes through [`EgressPolicy`], built per
//! run from the node's grants for the agent id ([`HostGrant`]s from
//! `SandboxConfig.allowed_hosts` and `grants`), narrowed by the run's metadata
//! `http.allow`. A request to a host (and port) not granted gets
//! `HTTP-request-denied`, an error the agent can handle, and the node logs
//! the host it tried to reach. An allowed request goes out through
//! wasmtime-wasi-http's default sender in an `http.request` span, with the
//! run's trace context (`traceparent` naming that span when traces are
//! exported, `X-Correlation-ID`), its connect and first-byte waits
//! bounded by the run's deadline, and its response body capped at
//! [`HTTP_RESPONSE_BYTES`]. What the host buffers for a run's requests is
//! bounded too: at most [`HostLimits::http_in_flight`] requests at once,
//! and each outgoing body's buffer to [`HostLimits::body_chunk_bytes`]
//! times its chunks (see `sandbox/host_memory.rs`).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use http::header::{HeaderName, HeaderValue};
use http::uri::Scheme;
use http_body_util::BodyExt;
use thiserror::Error;
use tracing::Instrument;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use crate::sandbox::host_memory::HostLimits;

/// The largest response body an agent may read; past it the body stream
/// ends with `HTTP-response-body-size`.
pub const HTTP_RESPONSE_BYTES: u64 = 1024 * 1024;

/// The run metadata key that narrows the node's grants for one run: a
/// comma-separated list of `host` or `host:port`.
pub const HTTP_ALLOW_METADATA_KEY: &str = "http.allow";

/// One allow-list entry: a host, and optionally the one port allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostGrant {
    /// Lowercase; an IPv6 address keeps its brackets (`[::1]`).
    pub host: String,
    /// `None`: any port of the host.
    pub port: Option<u16>,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("`{0}` is not a host or host:port allow-list entry")]
pub struct InvalidHostGrant(pub String);

impl HostGrant {
    /// Parses `host`, `host:port`, `[v6]` or `[v6]:port`.
    pub fn parse(entry: &str) -> Result<HostGrant, InvalidHostGrant> {
        let invalid = || InvalidHostGrant(entry.to_string());
        let entry_trimmed = entry.trim();
        if entry_trimmed.is_empty()
            || entry_trimmed.contains(['/', '@', '?', '#', ' ', '*'])
            || entry_trimmed.contains("://")
        {
            return Err(invalid());
        }
        let (host, port) = if let Some(rest) = entry_trimmed.strip_prefix('[') {
            let (address, after) = rest.split_once(']').ok_or_else(invalid)?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(invalid)?),
            };
            (format!("[{address}]"), port)
        } else {
            match entry_trimmed.split_once(':') {
                Some((host, port)) => (host.to_string(), Some(port)),
                None => (entry_trimmed.to_string(), None),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err(invalid());
        }
        let port = match port {
            None => None,
            Some(port) => Some(port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(invalid)?),
        };
        Ok(HostGrant {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    fn allows(&self, host: &str, port: u16) -> bool {
        self.host.eq_ignore_ascii_case(host) && self.port.is_none_or(|p| p == port)
    }

    /// What both grants allow: the same host, on the narrower port.
    fn intersect(&self, other: &HostGrant) -> Option<HostGrant> {
        if self.host != other.host {
            return None;
        }
        let port = match (self.port, other.port) {
            (Some(a), Some(b)) if a != b => return None,
            (Some(p), _) | (_, Some(p)) => Some(p),
            (None, None) => None,
        };
        Some(HostGrant {
            host: self.host.clone(),
            port,
        })
    }
}

impl fmt::Display for HostGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

/// One run's egress: what it may reach, and what its requests carry.
#[derive(Debug)]
pub struct EgressPolicy {
    allowed: Vec<HostGrant>,
    run_id: String,
    trace_id: String,
    deadline: Instant,
    limits: HostLimits,
    /// Requests sent and not yet finished (their connection task holds a
    /// count until it ends).
    in_flight: Arc<AtomicU32>,
    /// Requests sent and requests denied, for the run's report.
    pub(crate) requests: u32,
    pub(crate) denied: u32,
}

/// One request in flight; dropping it frees the place.
struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl EgressPolicy {
    /// The node's grants for the agent, narrowed by the run's metadata
    /// `http.allow` when present: only what both allow (metadata can never
    /// add a host; an empty `http.allow` allows nothing). Unparseable
    /// metadata entries allow nothing and are logged.
    pub fn new(
        node_grants: &[HostGrant],
        metadata_allow: Option<&str>,
        run_id: &str,
        trace_id: &str,
        deadline: Instant,
        limits: HostLimits,
    ) -> EgressPolicy {
        let allowed = match metadata_allow {
            None => node_grants.to_vec(),
            Some(list) => {
                let mut narrowed: Vec<HostGrant> = Vec::new();
                for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                    let wanted = match HostGrant::parse(entry) {
                        Ok(wanted) => wanted,
                        Err(err) => {
                            tracing::warn!("metadata {HTTP_ALLOW_METADATA_KEY}: {err}; ignored");
                            continue;
                        }
                    };
                    for grant in node_grants {
                        if let Some(both) = grant.intersect(&wanted)
                            && !narrowed.contains(&both)
                        {
                            narrowed.push(both);
                        }
                    }
                }
                narrowed
            }
        };
        EgressPolicy {
            allowed,
            run_id: run_id.to_string(),
            trace_id: trace_id.to_string(),
            deadline,
            limits,
            in_flight: Arc::default(),
            requests: 0,
            denied: 0,
        }
    }

    /// The effective allow-list.
    #[cfg(test)]
    pub fn allowed(&self) -> &[HostGrant] {
        &self.allowed
    }

    /// Whether `host` on `port` may be reached.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        self.allowed.iter().any(|grant| grant.allows(host, port))
    }

    /// `00-{trace id}-{span id}-01`: the span id is the request span's
    /// when traces are exported, else a fresh one.
    fn traceparent(&self, span_id: Option<u64>) -> Option<HeaderValue> {
        let trace_id = self.trace_id.to_ascii_lowercase();
        let valid = trace_id.len() == 32
            && trace_id.bytes().all(|b| b.is_ascii_hexdigit())
            && trace_id.bytes().any(|b| b != b'0');
        if !valid {
            return None;
        }
        let span_id = span_id.filter(|id| *id != 0).unwrap_or_else(|| {
            loop {
                let id: u64 = rand::random();
                if id != 0 {
                    break id;
                }
            }
        });
        HeaderValue::from_str(&format!("00-{trace_id}-{span_id:016x}-01")).ok()
    }
}

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
        let Some((host, port)) = destination(request.uri()) else {
            self.denied += 1;
            tracing::warn!(run_id = %self.run_id, "outbound HTTP denied: the request has no host");
            return Box::new(async { Err(Error::HttpRequestDenied) });
        };
        if !self.allows(&host, port) {
            self.denied += 1;
            tracing::warn!(
                run_id = %self.run_id,
                host = %host,
                port,
                "outbound HTTP denied: the host is not on this run's allow-list"
            );
            return Box::new(async { Err(Error::HttpRequestDenied) });
        }
        let in_flight = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let place = InFlight(self.in_flight.clone());
        if in_flight >= self.limits.http_in_flight {
            drop(place);
            self.denied += 1;
            tracing::warn!(
                run_id = %self.run_id,
                limit = self.limits.http_in_flight,
                "outbound HTTP refused: the run has as many requests in flight as a run may"
            );
            return Box::new(async { Err(Error::ConnectionLimitReached) });
        }
        self.requests += 1;
        tracing::debug!(host = %host, port, "outbound HTTP request");

        // One span per request (a child of the run's); its span id is the
        // parent the downstream service sees in `traceparent`.
        let span = tracing::info_span!(
            "http.request",
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
        Box::new(
            async move {
                let sent = tokio::time::timeout_at(
                    deadline.into(),
                    wasmtime_wasi_http::default_send_request(request, Some(options)),
                )
                .await;
                let (response, io) = match sent {
                    Ok(Ok(sent)) => sent,
                    Ok(Err(err)) => {
                        tracing::Span::current().record("error", tracing::field::display(&err));
                        tracing::info!(host = %host, port, "outbound HTTP request failed: {err}");
                        return Err(err);
                    }
                    Err(_elapsed) => {
                        tracing::Span::current().record("error", "cut off by the run's deadline");
                        tracing::info!(host = %host, port, "outbound HTTP request cut off by the run's deadline");
                        return Err(Error::ConnectionTimeout);
                    }
                };
                tracing::Span::current().record("http.status_code", response.status().as_u16());
                let (mut head, body) = response.into_parts();
                head.headers = match owned_headers(&head.headers, field_bytes) {
                    Some(headers) => headers,
                    None => {
                        tracing::info!(host = %host, port, limit = field_bytes, "outbound HTTP response refused: its headers are larger than a run may hold");
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
                // The connection's task holds the place until it ends.
                let io = async move {
                    let _place = place;
                    io.await
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

    fn grants(entries: &[&str]) -> Vec<HostGrant> {
        entries.iter().map(|e| HostGrant::parse(e).unwrap()).collect()
    }

    fn policy(node: &[&str], metadata: Option<&str>) -> EgressPolicy {
        EgressPolicy::new(
            &grants(node),
            metadata,
            "run-1",
            "4bf92f3577b34da6a3ce929d0e0e4736",
            Instant::now(),
            HostLimits::default(),
        )
    }

    #[test]
    fn entries_parse_hosts_ports_and_ipv6() {
        assert_eq!(
            HostGrant::parse("API.example.com").unwrap(),
            HostGrant {
                host: "api.example.com".into(),
                port: None
            }
        );
        assert_eq!(HostGrant::parse("127.0.0.1:8080").unwrap().port, Some(8080));
        assert_eq!(
            HostGrant::parse("[::1]:9").unwrap(),
            HostGrant {
                host: "[::1]".into(),
                port: Some(9)
            }
        );
        for bad in [
            "",
            "https://x.com",
            "x.com:http",
            "x.com:0",
            "x.com:70000",
            "a/b",
            ":80",
            "*.x.com",
        ] {
            assert!(HostGrant::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_host_grant_allows_any_port_and_a_port_grant_only_its_port() {
        let policy = policy(&["Example.com", "127.0.0.1:8080"], None);
        assert!(policy.allows("example.COM", 443));
        assert!(policy.allows("example.com", 8443));
        assert!(policy.allows("127.0.0.1", 8080));
        assert!(!policy.allows("127.0.0.1", 8081));
        assert!(!policy.allows("other.com", 443));
        assert!(!policy.allows("sub.example.com", 443));
    }

    #[test]
    fn metadata_narrows_and_never_widens() {
        let node = ["a.com", "b.com:8080", "c.com"];
        let narrowed = policy(&node, Some("a.com:443, b.com, evil.com"));
        assert_eq!(narrowed.allowed(), grants(&["a.com:443", "b.com:8080"]).as_slice());
        assert!(!narrowed.allows("a.com", 80));
        assert!(!narrowed.allows("c.com", 443));
        assert!(!narrowed.allows("evil.com", 443));
        assert!(policy(&node, Some("b.com:9090")).allowed().is_empty());
        assert!(policy(&node, Some("")).allowed().is_empty());
        assert!(policy(&[], Some("a.com")).allowed().is_empty());
    }

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

    #[test]
    fn traceparent_carries_the_trace_id_and_a_fresh_span_id() {
        let policy = policy(&[], None);
        let a = policy.traceparent(None).unwrap();
        let b = policy.traceparent(None).unwrap();
        let a = a.to_str().unwrap();
        assert!(
            a.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && a.ends_with("-01"),
            "{a}"
        );
        assert_eq!(a.len(), 55);
        assert_ne!(a, b.to_str().unwrap());
    }
}
